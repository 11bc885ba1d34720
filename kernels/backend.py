"""Which implementation of the adapter ops runs: the Triton kernels (CUDA) or the torch reference ops.

Chosen once at startup by the caller, which stores the answer; nothing here caches or switches.
"""

from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("triton", "torch")


def select_backend() -> str:
    """"triton" when CUDA is available and triton is importable, else "torch" (the CPU path)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return "torch"
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (missing libcuda stubs, ABI mismatch) falls back to torch
        return "torch"
    return "triton"


def describe_backend(backend: str) -> dict[str, str]:
    """For logs and /health: the active backend and what it runs on."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
    if backend == "triton":
        import triton
        return {"backend": "triton", "triton": triton.__version__, "device": torch.cuda.get_device_name()}
    why = "no CUDA device" if not torch.cuda.is_available() else "triton not importable"
    return {"backend": "torch", "torch": torch.__version__, "device": "cpu" if why == "no CUDA device" else "cuda",
            "reason": why}
