"""Fairness across tenants: does one tenant's flood delay another tenant's first token?

Tenant A floods the server with 64 streaming requests (more than the engine runs at once, so most
of them queue); once A's streams are decoding, tenant B sends one request. Reported per case, medians
over round-robin repeats: B's time to first token, the median inter-token gap of A's streams in the
seconds around B's arrival, and their ratio (target: <= 4, i.e. B waits a few engine steps, not for
A's queue to drain). Baseline in the same run: the same traffic with B's request sent as tenant A
(one tenant: plain arrival order, what a server without tenants does).

In process (the engine thread as the server runs it, no HTTP), default engine settings but
`--max-num-seqs 32`, so that the flood exceeds what runs at once.

Usage: python benchmarks/fairness.py [--dtype auto] [--flood 64] [--tokens 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, report_idle  # noqa: E402
from benchmarks.workload import prompts  # noqa: E402
from server.config import EngineConfig, ServerConfig  # noqa: E402
from server.cpu_threads import one_core_for_torch  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.engine.request import Request, SamplingParams  # noqa: E402
from server.runtime import Runtime, build_runtime  # noqa: E402


def one_run(runtime: Runtime, flood: int, tokens: int, b_tenant: str) -> tuple[float, float, int]:
    """(B's TTFT, A's median inter-token gap around B's arrival, preemptions) in seconds."""
    engine = runtime.engine
    stamps: dict[str, list[float]] = {}
    b_first = threading.Event()
    ids = prompts(runtime, flood + 1)

    def sink(rid: str):
        def emit(event) -> None:
            if event.token_ids:
                stamps.setdefault(rid, []).append(time.perf_counter())
            if rid == "b" and event.token_ids:
                b_first.set()

        return emit

    def request(rid: str, tenant: str, prompt: list[int], max_tokens: int) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return Request(rid, prompt, params, emit=sink(rid), arrival_time=time.perf_counter(), tenant=tenant)

    preempted_before = runtime.metrics.preemptions._value.get()
    for i in range(flood):
        engine.submit(request(f"a{i}", "A", ids[i], tokens))
    while sum(1 for rid in stamps if rid.startswith("a")) < min(flood, engine.scheduler.max_num_seqs):
        time.sleep(0.05)  # every KV slot runs one of A's streams
    time.sleep(1.0)
    b_sent = time.perf_counter()
    engine.submit(request("b", b_tenant, ids[flood], 8))
    b_first.wait(timeout=600)
    b_ttft = stamps["b"][0] - b_sent
    window = (b_sent - 2.0, stamps["b"][0])
    gaps = [
        t1 - t0
        for rid, s in stamps.items()
        if rid.startswith("a")
        for t0, t1 in zip(s, s[1:])
        if window[0] <= t1 <= window[1]
    ]
    for i in range(flood):  # done measuring: end the flood
        engine.abort(f"a{i}")
    engine.abort("b")
    while engine.scheduler.has_work():
        time.sleep(0.05)
    return b_ttft, statistics.median(gaps), int(runtime.metrics.preemptions._value.get() - preempted_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--flood", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-num-seqs", type=int, default=32, help="below the flood, so A's requests queue")
    args = parser.parse_args()
    report_idle()
    one_core_for_torch()  # the main thread only sets up, as the server's HTTP thread
    engine = EngineConfig(max_num_seqs=args.max_num_seqs)
    runtime = build_runtime(
        ServerConfig(model=DEMO_MODEL_DIR, dtype=args.dtype, adapters_dir=Path(tempfile.mkdtemp()), engine=engine)
    )
    print(
        f"{runtime.dtype}, at most {args.max_num_seqs} sequences running, flood of {args.flood} x {args.tokens} "
        "tokens, B asks for 8 tokens"
    )
    cases = {"B as another tenant (fair)": "B", "B as tenant A (arrival order)": "A"}
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in cases}
    runtime.engine.start()
    try:
        for _ in range(args.repeats):
            for name, tenant in cases.items():
                results[name].append(one_run(runtime, args.flood, args.tokens, tenant))
    finally:
        runtime.engine.stop()
    rows = []
    for name, runs in results.items():
        ttft = statistics.median(r[0] for r in runs)
        gap = statistics.median(r[1] for r in runs)
        ratio = statistics.median(r[0] / r[1] for r in runs)
        rows.append([name, ttft, gap * 1e3, ratio, statistics.median(r[2] for r in runs)])
    print_table(["case", "B TTFT (s)", "A gap (ms)", "TTFT / A gap", "preemptions"], rows)


if __name__ == "__main__":
    main()
