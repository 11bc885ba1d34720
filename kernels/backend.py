"""Which implementation of the adapter ops runs: the Triton kernels (CUDA) or the torch reference ops.

Chosen once at startup by the caller, which stores the answer; nothing here caches or switches.
"""

from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("triton", "torch")


def select_backend(device: torch.device) -> str:
    """ "triton" when the model runs on a CUDA device and triton is importable, else "torch" (the CPU path)."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return "torch"
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (missing libcuda stubs, ABI mismatch) falls back to torch
        return "torch"
    return "triton"


def describe_backend(backend: str, device: torch.device) -> dict[str, str]:
    """For logs and /health: the active backend, what it runs on, and why."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
    if backend == "triton":
        import triton

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
        return {"backend": "triton", "triton": triton.__version__, "device": name}
    why = "the model runs on the CPU" if device.type != "cuda" else "triton not importable"
    return {"backend": "torch", "torch": torch.__version__, "device": str(device), "reason": why}
