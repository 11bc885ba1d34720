"""Command-line and environment configuration, and the device/dtype decisions made from it."""

from __future__ import annotations

import pytest
import torch

from server.config import env_name, parse_args


def test_defaults_pick_cpu_and_float32_on_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    config = parse_args([])
    device = config.torch_device()
    assert device == torch.device("cpu") and config.torch_dtype(device) == torch.float32


def test_auto_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    config = parse_args([])
    device = config.torch_device()
    assert device.type == "cuda" and config.torch_dtype(device) == torch.bfloat16


def test_flag_and_env_var(monkeypatch):
    monkeypatch.setenv(env_name("--max-slots"), "5")
    config = parse_args(["--device", "cpu", "--dtype", "bfloat16", "--max-num-seqs", "3"])
    assert config.device == "cpu" and config.adapters.max_slots == 5 and config.engine.max_num_seqs == 3
    assert config.torch_dtype(config.torch_device()) == torch.bfloat16


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "gpu"],
        ["--device", "cuda:x"],
        ["--dtype", "float16"],
        ["--max-num-seqs", "0"],
        ["--adapter-mode", "fast"],
    ],
)
def test_bad_values_are_rejected_with_the_reason(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert argv[0].lstrip("-").split("-")[0] in capsys.readouterr().err.replace("_", "-")


def test_cuda_requested_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        parse_args(["--device", "cuda:1"]).torch_device()
