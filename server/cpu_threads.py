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
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


class CpuTurns:
    """Background CPU work (parsing a cold adapter, validating an upload) runs between engine steps.

    Why: the engine's OpenMP team keeps every core busy during a step and each of its ~600 ops ends in
    a barrier, so a background thread that takes a core mid-step stalls the whole team, not one thread:
    measured on 2 cores, 8 streams decoding at 86 ms a step while the loader parsed 50 cold adapters,
    the slowest step took 2.2x the median at nice 5 and 3.3x at nice 0 (1.3x at nice 19, where a load
    then waits seconds for the CPU). Taking turns makes the price exact: no step overlaps a background
    section; before each step the engine lets background sections run for a budget (a share of its
    step time, so a step boundary costs a bounded fraction of a step) and at least one waiting section.

    Background threads wrap short CPU-bound sections in `background()`: tens of ms, no disk I/O (a
    read or fsync can take 100+ ms on a busy disk, and the engine would wait for it) and nothing that
    waits for the engine. The engine wraps each step in `engine_step()`. While the engine is idle,
    sections start at once.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True  # the engine is between steps or idle: a section may start
        self._waiting = 0  # sections waiting for a turn
        self._granted = 0  # turns handed to waiting sections, not yet taken
        self._running = 0  # sections running now

    @contextmanager
    def background(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while not (self._open or self._granted):
                self._cond.wait()
            self._waiting -= 1
            if self._granted:
                self._granted -= 1
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def engine_step(self, budget_s: float = 0.0) -> Iterator[None]:
        """Around one engine step. Before it, background sections may start for up to `budget_s`
        seconds (one that already waits always gets its turn); the step then waits for every
        running section to finish."""
        with self._cond:
            self._granted = min(self._waiting, 1)
            self._open = budget_s > 0
            if self._granted or self._open:
                self._cond.notify_all()
            deadline = time.perf_counter() + budget_s
            while self._open and (self._waiting or self._running) and time.perf_counter() < deadline:
                self._cond.wait(max(deadline - time.perf_counter(), 0.0))
            self._open = False  # sections arriving from now on wait for a later step's turn
            while self._granted or self._running:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._open = True
                self._cond.notify_all()
