"""CpuTurns: background sections never overlap an engine step, one runs at each step boundary, and
neither side can starve the other."""

from __future__ import annotations

import threading
import time

from server.cpu_threads import CpuTurns


class Timeline:
    """Records (what, start, end) intervals from several threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, float, float]] = []

    def span(self, what: str, seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)
        with self.lock:
            self.spans.append((what, start, time.perf_counter()))

    def of(self, prefix: str) -> list[tuple[float, float]]:
        return sorted((a, b) for what, a, b in self.spans if what.startswith(prefix))


def _engine(turns: CpuTurns, timeline: Timeline, steps: int, step_s: float) -> threading.Thread:
    def run() -> None:
        for i in range(steps):
            with turns.engine_step():
                timeline.span(f"step{i}", step_s)

    return threading.Thread(target=run)


def _background(turns: CpuTurns, timeline: Timeline, name: str, sections: int, section_s: float) -> threading.Thread:
    def run() -> None:
        for i in range(sections):
            with turns.background():
                timeline.span(f"{name}{i}", section_s)

    return threading.Thread(target=run)


def test_sections_never_overlap_a_step_and_one_runs_at_each_boundary():
    turns, timeline = CpuTurns(), Timeline()
    engine = _engine(turns, timeline, steps=30, step_s=0.01)
    loaders = [_background(turns, timeline, f"bg{k}-", sections=6, section_s=0.005) for k in range(2)]
    engine.start()
    time.sleep(0.015)  # the engine is stepping before the background work arrives
    for thread in loaders:
        thread.start()
    for thread in (engine, *loaders):
        thread.join(timeout=30)
    steps, sections = timeline.of("step"), timeline.of("bg")
    assert len(steps) == 30 and len(sections) == 12  # nobody starved
    for a, b in sections:
        assert all(b <= s or a >= e for s, e in steps), "a background section overlapped a step"
    # Between two consecutive steps at most one section ran (both loaders were waiting throughout).
    for (_, end), (start, _) in zip(steps, steps[1:]):
        assert sum(1 for a, b in sections if a >= end and b <= start) <= 1


def test_sections_run_at_once_while_the_engine_is_idle_and_a_step_waits_for_a_running_one():
    turns, timeline = CpuTurns(), Timeline()
    started = time.perf_counter()
    with turns.background():  # no engine stepping: no wait
        entered = time.perf_counter() - started
    assert entered < 0.05
    section = _background(turns, timeline, "bg", sections=1, section_s=0.05)
    section.start()
    time.sleep(0.01)  # the section is running
    with turns.engine_step():
        step_start = time.perf_counter()
    section.join()
    ((_, section_end),) = timeline.of("bg")
    assert step_start >= section_end


def test_with_a_budget_several_sections_run_per_boundary_and_none_is_left_waiting():
    turns, timeline = CpuTurns(), Timeline()

    def engine() -> None:
        for i in range(20):
            with turns.engine_step(budget_s=0.02):
                timeline.span(f"step{i}", 0.01)

    loader = _background(turns, timeline, "bg", sections=12, section_s=0.003)
    stepping = threading.Thread(target=engine)
    stepping.start()
    time.sleep(0.015)
    loader.start()
    loader.join(timeout=10)
    stepping.join(timeout=10)
    assert not loader.is_alive() and not stepping.is_alive(), "a turn was never handed back"
    steps, sections = timeline.of("step"), timeline.of("bg")
    assert len(sections) == 12
    for a, b in sections:
        assert all(b <= s or a >= e for s, e in steps), "a background section overlapped a step"
    between = [sum(1 for a, b in sections if a >= end and b <= start) for (_, end), (start, _) in zip(steps, steps[1:])]
    assert max(between) > 1  # the budget let several run at one boundary
