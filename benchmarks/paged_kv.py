"""Paged KV cache and prefix caching on SmolLM2, one run, default engine settings.

(a) Capacity: 64 concurrent conversations of 512 tokens (448-token prompt + 64 generated): once their
    prompts are in, are all 64 running at once in the default KV budget (no queueing)? Blocks they
    need at full length vs the budget, and the time of one decode step of all 64.
(b) Throughput at 16 and 64 concurrent requests (same prompts, 64 new tokens each), round-robin
    repeats, medians; with the decode step and the bare weight-matmul roofline of the same batch.
(c) Prefix caching: TTFT of a request with a 1,000-token prefix (a LoRA r16 q,k,v,o adapter), then
    of a second one with the same prefix and another question (cached), then of one after the
    adapter id is re-uploaded (a new version: must not reuse), and with prefix caching off.

Usage: python benchmarks/paged_kv.py [--dtype float32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, report_idle  # noqa: E402
from benchmarks.throughput import roofline_step_seconds  # noqa: E402
from benchmarks.workload import TOPICS, lora_files, run_engine  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.engine.request import Request, SamplingParams  # noqa: E402
from server.runtime import Runtime, build_runtime  # noqa: E402
from tests.conftest import drive  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def conversation(runtime: Runtime, i: int, tokens: int) -> list[int]:
    text = f"Tell me about the history of {TOPICS[i % len(TOPICS)]}, conversation {i}. " * 200
    return runtime.tokenizer.encode(text)[:tokens]


def capacity(runtime: Runtime, n: int, prompt: int, new: int) -> tuple[int, int, int, float]:
    """(running once every prompt is in, still waiting then, blocks the n conversations need at full
    length, first decode step seconds) for n conversations submitted at once; aborted after that step."""
    engine = runtime.engine
    for i in range(n):
        params = SamplingParams(max_tokens=new, ignore_eos=True)
        engine.admit(Request(f"c{i}", conversation(runtime, i, prompt), params, emit=lambda e: None))
    while any(s.in_prefill for s in engine.scheduler.running) or (
        engine.scheduler.waiting and len(engine.scheduler.running) < n
    ):
        engine.step()
    running, waiting = len(engine.scheduler.running), len(engine.scheduler.waiting)
    started = time.perf_counter()
    engine.step()  # one decode step of all of them
    step = time.perf_counter() - started
    for i in range(n):
        engine.abort(f"c{i}")
    engine._drain_inbox(block=False)
    return running, waiting, n * engine.scheduler.blocks.blocks_for(prompt + new), step


def ttft(runtime: Runtime, ids: list[int], adapter: str) -> float:
    """Seconds from admission to the first token of one request, alone in the engine."""
    first: list[float] = []
    emit = lambda event: first.append(time.perf_counter()) if event.token_ids and not first else None  # noqa: E731
    start = time.perf_counter()
    request = Request("p", ids, SamplingParams(max_tokens=1), emit=emit, arrival_time=start)
    request.adapter_version = runtime.adapters.resolve(adapter)
    drive(runtime, {0: [request]})
    return first[0] - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report_idle()
    runtime = build_runtime(ServerConfig(model=DEMO_MODEL_DIR, dtype=args.dtype, adapters_dir=Path(tempfile.mkdtemp())))
    blocks = runtime.engine.scheduler.blocks
    print(
        f"{runtime.dtype}, KV budget {runtime.config.engine.kv_cache_gb} GiB = {blocks.num_blocks - 1} blocks of "
        f"{blocks.block_size} positions, max_num_seqs {runtime.config.engine.max_num_seqs}"
    )

    running, waiting, needed, step = capacity(runtime, 64, 448, 64)
    print("\n(a) capacity: 64 conversations of 448 + 64 tokens submitted at once")
    print_table(
        ["running", "waiting", "blocks needed at 512 tokens", "blocks in budget", "decode step at ~449 ms"],
        [[running, waiting, needed, blocks.num_blocks - 1, step * 1e3]],
    )

    print("\n(b) throughput, 32-token prompts, 64 new tokens each (round-robin repeats, medians)")
    results: dict[int, list] = {16: [], 64: []}
    for _ in range(args.repeats):
        for n in results:
            results[n].append(run_engine(runtime, [conversation(runtime, i, 32) for i in range(n)], 64))
    rows = []
    for n, runs in results.items():
        tok_s = statistics.median(r.tok_s for r in runs)
        step = statistics.median(r.decode_step for r in runs)
        roof = roofline_step_seconds(runtime, n)
        rows.append(
            [n, tok_s, tok_s / statistics.median(r.tok_s for r in results[16]), step * 1e3, roof * 1e3, step / roof]
        )
    print_table(["concurrent", "tok/s", "vs 16", "decode step ms", "roofline step ms", "step/roofline"], rows)

    print("\n(c) prefix caching: 1,000-token prefix, LoRA r16 q,k,v,o (TTFT medians)")
    runtime.adapters.upload("chat", *lora_files(runtime, 16, QKVO, seed=1))
    prefix = conversation(runtime, 999, 1000)
    question = lambda i: runtime.tokenizer.encode(f" Question {i}: what happened next?")  # noqa: E731
    counts = blocks.counts
    cases: dict[str, list[float]] = {"first (cold)": [], "same prefix, same version": [], "caching off": []}
    for r in range(args.repeats):
        runtime.adapters.upload("chat", *lora_files(runtime, 16, QKVO, seed=100 + r))  # a fresh version: cold
        cases["first (cold)"].append(ttft(runtime, prefix + question(0), "chat"))
        hit_before = counts.hit_tokens
        cases["same prefix, same version"].append(ttft(runtime, prefix + question(1), "chat"))
        reused = counts.hit_tokens - hit_before
        runtime.engine.scheduler.prefix_caching = False
        cases["caching off"].append(ttft(runtime, prefix + question(2), "chat"))
        runtime.engine.scheduler.prefix_caching = True
    hit_before = counts.hit_tokens
    runtime.adapters.upload("chat", *lora_files(runtime, 16, QKVO, seed=999))  # same id, new version
    new_version = ttft(runtime, prefix + question(3), "chat")
    new_version_reused = counts.hit_tokens - hit_before
    cold = statistics.median(cases["first (cold)"])
    rows = [[name, statistics.median(v) * 1e3, statistics.median(v) / cold] for name, v in cases.items()]
    rows.append(["same id, new version", new_version * 1e3, new_version / cold])
    print_table(["request", "TTFT ms", "vs first"], rows)
    print(f"tokens reused: same version {reused} of {len(prefix)}; new version {new_version_reused}")


if __name__ == "__main__":
    main()
