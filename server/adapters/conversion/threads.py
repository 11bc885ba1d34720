"""The conversion thread computes on one core, without touching the engine's thread settings.

torch's thread count (`torch.set_num_threads`) is process-wide: it sets MKL's global count, so it
would slow the engine too. OpenMP's and MKL's *thread-local* counts are not: `omp_set_num_threads`
sets the calling thread's own count (ATen's parallel loops read it), and `MKL_Set_Num_Threads_Local`
overrides MKL's global count for the calling thread (LAPACK's SVD, BLAS). One core also matters on
its own: measured on the 2-core dev VM while the engine (or anything else) ran, a 576 x 576 float64
SVD took 10 s with two OpenMP threads spin-waiting against the other team, and 0.1 s with one.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from server.adapters.loader import lower_thread_priority

log = logging.getLogger(__name__)

_LIBS = Path(torch.__file__).parent / "lib"


def _set_local(library: str, function: str) -> bool:
    try:
        setter = getattr(ctypes.CDLL(str(_LIBS / library)), function)
    except (OSError, AttributeError):
        return False
    setter.argtypes = [ctypes.c_int]
    setter(1)
    return True


def single_core_thread() -> None:
    """Thread initializer: low OS priority, and one core for this thread's torch math where the
    build allows it (MKL + GNU OpenMP, torch's CPU wheels); elsewhere the math keeps torch's count."""
    lower_thread_priority()
    # ATen sets a thread's counts to the process-wide ones on its first parallel op in that thread
    # (lazy init); get_num_threads() triggers that now, so it cannot undo what follows.
    torch.get_num_threads()
    omp = _set_local("libgomp.so.1", "omp_set_num_threads")
    mkl = _set_local("libtorch_cpu.so", "MKL_Set_Num_Threads_Local")
    if not (omp and mkl):
        log.info("conversion thread: thread-local OpenMP/MKL counts unavailable (omp %s, mkl %s)", omp, mkl)
