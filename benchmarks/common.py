"""Helpers shared by the benchmarks: idle check, timing, table printing."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over `seconds` (from /proc/stat), to check the machine is idle."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("unknown CPU", set()) elsewhere."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_description() -> str:
    """The CPU model and the flags that decide matmul speed (machines differ between sessions)."""
    model, flags = cpu_info()
    present = ", ".join(f for f in MATMUL_FLAGS if f in flags) or "none of " + ", ".join(MATMUL_FLAGS)
    return f"{model}, {os.cpu_count()} cores, flags: {present}"


def report_idle() -> None:
    """Every benchmark starts here: which machine, and whether it is idle."""
    print(f"CPU: {cpu_description()}")
    busy = cpu_busy_fraction()
    load = os.getloadavg()[0]
    state = "idle" if busy < 0.15 else "BUSY - numbers below are not trustworthy"
    print(f"machine check: {busy:.0%} of CPU busy before the run, load average {load:.2f} -> {state}")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def on_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread with torch's full thread count; its OpenMP team ends
    with it, so nothing it ran slows the engine afterwards. Benchmarks that start the engine thread
    put their main thread on one core (`one_core_for_torch`, as the server's HTTP thread) and run
    what they measure here: a main thread that had run one multi-threaded op would keep an OpenMP team
    alive and slow every engine step by up to ~1.5x on a 2-core machine (server/cpu_threads.py)."""
    result: list = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="benchmark-work")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
