from __future__ import annotations

import pytest
import torch

from kernels import backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_cpu_selects_torch_and_says_why():
    assert backend.select_backend(CPU) == "torch"
    assert backend.describe_backend("torch", CPU) == {
        "backend": "torch",
        "torch": torch.__version__,
        "device": "cpu",
        "reason": "the model runs on the CPU",
    }


def test_cuda_with_triton_selects_triton():
    assert backend.select_backend(CUDA) == "triton"  # triton is a Linux dependency of the project


def test_cuda_without_triton_selects_torch(monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    assert backend.select_backend(CUDA) == "torch"
    assert backend.describe_backend("torch", CUDA)["reason"] == "triton not importable"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError):
        backend.describe_backend("cuda", CPU)
