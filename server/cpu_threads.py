"""Only the engine thread does torch math on every core; every other thread that touches torch uses one.

Why (measured on the 2-core dev VM, torch's CPU wheel with GNU OpenMP): each thread that runs a parallel
torch op gets its own OpenMP team, and the team's worker threads live as long as that thread does. Once
the process has more OpenMP threads than cores, libgomp stops spin-waiting at the end of every parallel
region and puts its workers to sleep instead, so *every* small op of the engine pays a futex wake-up: a
16 x 576 x 1536 float32 matmul on the engine thread took 180 us alone and 280 us while one idle upload
worker that had once validated an adapter was alive; an engine step at 16 sequences went from 51 to 83 ms.
Threads that never run a multi-threaded region add no workers, and the engine's team keeps spinning.

torch's own `torch.set_num_threads` is process-wide (it sets MKL's global count) and would slow the
engine too, so the counts here are the *thread-local* ones: `omp_set_num_threads` sets the calling
thread's OpenMP count (ATen's parallel loops read it) and `MKL_Set_Num_Threads_Local` overrides MKL's
global count for the calling thread (BLAS, LAPACK).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_LIBS = Path(torch.__file__).parent / "lib"


def _set_local(library: str, function: str, count: int) -> bool:
    try:
        setter = getattr(ctypes.CDLL(str(_LIBS / library)), function)
    except (OSError, AttributeError):
        return False
    setter.argtypes = [ctypes.c_int]
    setter(count)
    return True


def one_core_for_torch() -> None:
    """Make the calling thread's torch math single-threaded where the build allows it (MKL + GNU
    OpenMP, torch's CPU wheels); elsewhere the thread keeps torch's count."""
    # ATen sets a thread's counts to the process-wide ones on its first parallel op in that thread
    # (lazy init); get_num_threads() triggers that now, so it cannot undo what follows.
    torch.get_num_threads()
    omp = _set_local("libgomp.so.1", "omp_set_num_threads", 1)
    mkl = _set_local("libtorch_cpu.so", "MKL_Set_Num_Threads_Local", 1)
    if not (omp and mkl):
        log.debug("thread-local OpenMP/MKL counts unavailable (omp %s, mkl %s)", omp, mkl)


def lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to the engine (measured without it: an inter-token gap
    2.7x the median while uploading)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
    except (AttributeError, OSError):
        pass


def background_thread() -> None:
    """Initializer for every thread that works beside the engine (loader, uploads, conversions,
    registry sync): low OS priority and one core for its torch math."""
    lower_thread_priority()
    one_core_for_torch()
