"""Merged vs gathered vs auto: per-token latency, merge/restore cost, and a mixed trace.

One process, float32, SmolLM2:
  1. TTFT and time per output token (TPOT) at 1 and 4 concurrent requests of one LoRA r16 adapter
     (q,k,v,o), for the base model, gathered, merged and auto modes (32-token prompts, 48 tokens;
     median of 3 round-robin runs; the merge itself is in TTFT).
  2. Merge and restore time per kind (LoRA r16 all targets, DoRA r16, VeRA r256, RandLoRA r32).
  3. A trace: Poisson arrivals, adapter popularity Zipf(1.0) over 16 LoRA adapters (as in
     Punica / S-LoRA), 32 new tokens each, replayed in real time against the engine thread under
     always-gathered, always-merged and auto; mean / p99 latency and throughput.

Usage: python benchmarks/latency.py [--requests 40] [--rate 1.5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import on_fresh_thread, print_table, report_idle  # noqa: E402
from benchmarks.workload import TokenClock, lora_files, prompts, randlora_files, run_engine, vera_files  # noqa: E402
from server.config import AdapterConfig, EngineConfig, ServerConfig  # noqa: E402
from server.cpu_threads import one_core_for_torch  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.engine.request import Request, SamplingParams  # noqa: E402
from server.runtime import Runtime, build_runtime  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = QKVO + ["gate_proj", "up_proj", "down_proj"]


def per_token_latency(runtime: Runtime, tokens: int, repeats: int) -> list[list]:
    """Median over `repeats` round-robin runs per mode (this machine drifts ~10% run to run)."""
    rows = []
    cases = (
        ("base", None, "gathered"),
        ("gathered", "lat", "gathered"),
        ("merged", "lat", "merged"),
        ("auto", "lat", "auto"),
    )
    for n in (1, 4):
        batch = prompts(runtime, n)
        runs: dict[str, list] = {label: [] for label, _, _ in cases}
        for _ in range(repeats):
            for label, adapter, mode in cases:
                runtime.engine.restore_base()
                runs[label].append(on_fresh_thread(run_engine, runtime, batch, tokens, [adapter] * n, mode))
        for label, _, _ in cases:
            tpot = statistics.median(r.tpot for r in runs[label])
            ttft = statistics.median(r.ttft for r in runs[label])
            tok_s = statistics.median(r.tok_s for r in runs[label])
            rows.append([n, label, tpot * 1e3, ttft * 1e3, tok_s])
        base_tpot = rows[-4][2]
        for row in rows[-4:]:
            row.insert(3, row[2] / base_tpot)
    return rows


def merge_costs(runtime: Runtime) -> list[list]:
    manager = runtime.engine.runner.adapters
    rows = []
    for kind, files in (
        ("LoRA r16 all 7", lora_files(runtime, 16, ALL, seed=1)),
        ("DoRA r16 all 7", lora_files(runtime, 16, ALL, seed=2, dora=True)),
        ("VeRA r256 qkvo", vera_files(runtime, 256, QKVO, 0, 3)),
        ("RandLoRA r32 qkvo", randlora_files(runtime, 32, QKVO, 0, 4)),
    ):
        version = runtime.adapters.upload(f"merge-{kind.split()[0].lower()}", *files).version
        runtime.adapters.cache.hold(version)
        merges, restores = [], []
        for _ in range(3):
            merges.append(manager.merge(version))
            restores.append(manager.restore())
        runtime.adapters.cache.release(version)
        rows.append([kind, statistics.median(merges) * 1e3, statistics.median(restores) * 1e3])
    return rows


def make_trace(n: int, rate: float, adapters: int, seed: int = 0) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(adapters)]  # Zipf(1.0) popularity
    t, trace = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        trace.append((t, rng.choices(range(adapters), weights)[0]))
    return trace


def replay(runtime: Runtime, trace: list[tuple[float, int]], mode: str, tokens: int) -> dict[str, float]:
    engine = runtime.engine
    batch = prompts(runtime, len(trace))
    arrival: dict[str, float] = {}
    clock = TokenClock(len(trace))
    first, done = clock.first, clock.done

    engine.restore_base()
    engine.start()
    start = time.perf_counter()
    try:
        for i, (at, adapter) in enumerate(trace):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            rid = f"t{i}"
            arrival[rid] = time.perf_counter()
            version = runtime.adapters.resolve(f"zipf-{adapter}")
            engine.submit(
                Request(
                    rid,
                    batch[i],
                    SamplingParams(max_tokens=tokens, ignore_eos=True),
                    emit=clock.sink(rid),
                    adapter_version=version,
                    arrival_time=arrival[rid],
                    mode=mode,
                )
            )
        clock.all_done.wait(timeout=900)
    finally:
        engine.stop()
    latencies = sorted(done[r] - arrival[r] for r in done)
    makespan = max(done.values()) - start
    return {
        "mean": statistics.mean(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "ttft": statistics.mean(first[r] - arrival[r] for r in first),
        "tok_s": len(done) * tokens / makespan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=1.5, help="Poisson arrivals per second")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    args = parser.parse_args()
    report_idle()
    one_core_for_torch()  # the main thread only sets up, as the server's HTTP thread
    runtime = build_runtime(
        ServerConfig(
            model=args.model,
            dtype="float32",
            adapters_dir=Path(tempfile.mkdtemp(prefix="latency-bench-")),
            engine=EngineConfig(max_model_len=256, max_num_seqs=16, kv_cache_gb=2),
            adapters=AdapterConfig(max_slots=16, max_merge_wait_ms=500),
        )
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, SmolLM2")
    runtime.adapters.upload("lat", *lora_files(runtime, 16, QKVO, seed=7))
    on_fresh_thread(run_engine, runtime, prompts(runtime, 2), 4)  # warm-up
    print_table(
        ["concurrent", "mode", "TPOT ms", "TPOT vs base", "TTFT ms", "tok/s"],
        per_token_latency(runtime, args.tokens, args.repeats),
    )
    print_table(["kind", "merge ms", "restore ms"], merge_costs(runtime))
    for i in range(16):
        runtime.adapters.upload(f"zipf-{i}", *lora_files(runtime, 16, QKVO, seed=500 + i))
    trace = make_trace(args.requests, args.rate, 16)
    results = {mode: replay(runtime, trace, mode, 32) for mode in ("gathered", "merged", "auto")}
    print(
        f"trace: {args.requests} requests, Poisson {args.rate}/s, Zipf(1) over 16 LoRA r16 adapters, "
        f"32 new tokens, merge wait bound 500 ms"
    )
    print_table(
        ["policy", "mean latency s", "p99 latency s", "mean TTFT s", "tok/s", "mean vs best fixed"],
        [
            [
                mode,
                r["mean"],
                r["p99"],
                r["ttft"],
                r["tok_s"],
                r["mean"] / min(results["gathered"]["mean"], results["merged"]["mean"]),
            ]
            for mode, r in results.items()
        ],
    )


if __name__ == "__main__":
    main()
