from __future__ import annotations

import pytest
import torch

from kernels import backend


def test_cpu_selects_torch_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.select_backend() == "torch"
    assert backend.describe_backend("torch") == {"backend": "torch", "torch": torch.__version__, "device": "cpu",
                                                 "reason": "no CUDA device"}


def test_cuda_with_triton_selects_triton(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.select_backend() == "triton"          # triton is a Linux dependency of the project


def test_cuda_without_triton_selects_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    assert backend.select_backend() == "torch"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError):
        backend.describe_backend("cuda")
