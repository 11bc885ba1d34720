"""Mixed-adapter throughput on SmolLM2, upload->ready latency, and stream stalls during uploads.

One process, float32 by default, 16 concurrent greedy requests (32-token prompts, 64 new tokens), each
engine case run 3 times round-robin and the median reported:
  (a) base only   (b) one LoRA r16 q,k,v,o for all   (c) 8 distinct LoRA r16 q,k,v,o, 2 requests each
  (d) 16 distinct adapters, ranks 8..64, all seven targets mixed with q,k,v,o
  (e) PEFT + transformers generate(adapter_names=...) on the batch of (c), and PEFT's own base
  (f) 8 VeRA r256 q,k,v,o adapters of one seed   (g) 8 RandLoRA r32 q,k,v,o adapters of one seed
  (PEFT cannot batch VeRA or RandLoRA adapters at all), and the bytes each kind keeps on disk.
Then: median upload->ready latency over 20 uploads (parse + validate + durable store + register,
no network), and the largest inter-token gap of 8 running streams while 20 adapters are uploaded.

Residency (`--only residency` runs just this): 1,000 registered LoRA r16 q,k,v,o adapters with a
host cache that holds ~130 of them; 16 closed-loop clients each send requests on a random one of the
1,000 (cold: most need a disk load and a slot load) vs the same traffic on 16 warm adapters, round-robin
repeats, medians: throughput and p99 TTFT. Then the largest inter-token gap of 8 running streams while
50 cold adapters are loaded by the loader and 20 others are uploaded.

Usage: python benchmarks/adapters.py [--dtype float32] [--tokens 64] [--only residency]
"""

from __future__ import annotations

import argparse
import queue
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import on_fresh_thread, print_table, report_idle  # noqa: E402
from benchmarks.workload import (  # noqa: E402
    lora_files,
    prompts,
    randlora_files,
    run_engine,
    vera_files,
    write_adapter_dir,
)
from server.config import AdapterConfig, EngineConfig, ServerConfig, TenantConfig  # noqa: E402
from server.cpu_threads import one_core_for_torch  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.engine.request import Request, SamplingParams  # noqa: E402
from server.runtime import Runtime, build_runtime  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = QKVO + ["gate_proj", "up_proj", "down_proj"]
CONCURRENCY = 16


def peft_tok_s(
    model_dir: Path,
    dtype: torch.dtype,
    adapter_dirs: list[Path],
    names: list[str],
    batch: list[list[int]],
    new_tokens: int,
) -> float:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
        for i, d in enumerate(adapter_dirs[1:], start=1):
            model.load_adapter(d, adapter_name=f"a{i}")
    ids = torch.tensor(batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            adapter_names=names,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=2,
        )
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(batch) * new_tokens / (time.perf_counter() - start)


def upload_latency_ms(runtime: Runtime, uploads: list[tuple[bytes, bytes]]) -> float:
    samples = []
    for i, (config, weights) in enumerate(uploads):
        start = time.perf_counter()
        runtime.adapters.upload(f"latency-{i}", config, weights)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def closed_loop(
    runtime: Runtime, pick, batch: list[list[int]], requests: int, new_tokens: int, clients: int = CONCURRENCY
) -> tuple[float, list[float]]:
    """`clients` closed-loop clients (each sends its next request when the last one ends), every request
    on adapter `pick()`, through the running engine thread as the HTTP path does it (resolve, submit).
    Returns (tokens/s, every request's TTFT in seconds)."""
    engine = runtime.engine
    ended: queue.SimpleQueue[str] = queue.SimpleQueue()
    ttfts: list[float] = []

    def submit(n: int) -> None:
        rid, arrival = f"loop{n}", time.perf_counter()
        first: list[float] = []

        def emit(event) -> None:
            if not first:
                first.append(time.perf_counter())
                ttfts.append(first[0] - arrival)
            if event.finish_reason is not None:
                assert event.finish_reason == "length", event
                ended.put(rid)

        version = runtime.adapters.resolve(pick())
        engine.submit(
            Request(
                rid,
                batch[n % len(batch)],
                SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                emit=emit,
                adapter_version=version,
                arrival_time=arrival,
                mode="gathered",
            )
        )

    engine.start()
    try:
        start = time.perf_counter()
        for n in range(clients):
            submit(n)
        for n in range(clients, requests + clients):
            ended.get(timeout=600)
            if n < requests:
                submit(n)
        wall = time.perf_counter() - start
    finally:
        engine.stop()
    return requests * new_tokens / wall, ttfts


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]


def residency(args, work: Path) -> None:
    runtime = build_runtime(
        ServerConfig(
            model=args.model,
            dtype=args.dtype,
            adapters_dir=work / "cold-store",
            engine=EngineConfig(max_model_len=256, max_num_seqs=16, kv_cache_gb=2),
            adapters=AdapterConfig(max_slots=16, host_cache_gb=1.0),
            tenants=TenantConfig(max_adapters=args.cold + 100, max_adapter_gb=100.0),
        )
    )
    started = time.perf_counter()
    cold = args.cold
    for i in range(cold):
        runtime.adapters.upload(f"cold-{i}", *lora_files(runtime, 16, QKVO, seed=5000 + i))
    for i in range(16):
        runtime.adapters.upload(f"warm-{i}", *lora_files(runtime, 16, QKVO, seed=7000 + i))
    cache = runtime.adapters.cache
    print(
        f"registered {cold + 16} adapters in {time.perf_counter() - started:.0f} s; host cache holds {len(cache)} "
        f"({cache.nbytes / 2**20:.0f} MiB of a {cache.max_bytes / 2**20:.0f} MiB budget)"
    )
    batch = prompts(runtime, CONCURRENCY)
    rng = random.Random(0)
    traffic = {
        "16 warm adapters": lambda: f"warm-{rng.randrange(16)}",
        f"{cold:,} cold adapters": lambda: f"cold-{rng.randrange(cold)}",
    }
    closed_loop(runtime, traffic["16 warm adapters"], batch, 32, 8)  # warm-up: slots hold the warm ones
    runs: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in traffic}
    tiers_before = {
        name: (c.hits, c.loads)
        for name, c in (("host", cache.counts), ("slot", runtime.engine.scheduler.adapter_slots.counts))
    }
    for _ in range(args.repeats):
        for name, pick in traffic.items():
            runs[name].append(closed_loop(runtime, pick, batch, args.requests, args.tokens))
    rows, warm = [], None
    for name, results in runs.items():
        tok_s = statistics.median(r[0] for r in results)
        tail = statistics.median(p99(r[1]) for r in results)
        warm = warm or (tok_s, tail)
        rows.append(
            [
                name,
                tok_s,
                tok_s / warm[0],
                statistics.median(statistics.median(r[1]) for r in results) * 1e3,
                tail * 1e3,
                tail / warm[1],
            ]
        )
    print(
        f"{CONCURRENCY} closed-loop clients, {args.requests} requests x {args.tokens} tokens per run, "
        f"{args.repeats} round-robin runs, medians"
    )
    print_table(["traffic", "tok/s", "vs warm", "TTFT p50 ms", "TTFT p99 ms", "p99 vs warm"], rows)
    counts = [
        [tier, c.hits - tiers_before[tier][0], c.loads - tiers_before[tier][1], c.evictions]
        for tier, c in (("host", cache.counts), ("slot", runtime.engine.scheduler.adapter_slots.counts))
    ]
    print_table(["tier", "hits", "loads", "evictions (total)"], counts)
    not_in_memory = [f"cold-{i}" for i in range(cold) if not cache.resident(runtime.adapters.get(f"cold-{i}").version)]
    print(f"{len(not_in_memory)} of the cold adapters are on disk only; loading 50 of them")
    uploads = [lora_files(runtime, 16, QKVO, seed=9000 + i) for i in range(20)]
    worst, median_gap = stream_gaps(
        runtime, max(args.tokens, 128), uploads, not_in_memory[:50], [f"warm-{i}" for i in range(8)]
    )
    print_table(
        ["measure", "value"],
        [
            ["8 streams during 50 cold loads + 20 uploads: largest inter-token gap", f"{worst:.1f} ms"],
            ["8 streams during 50 cold loads + 20 uploads: median inter-token gap", f"{median_gap:.1f} ms"],
            ["largest / median gap", f"{worst / median_gap:.2f}x"],
        ],
    )


def stream_gaps(
    runtime: Runtime,
    new_tokens: int,
    uploads: list[tuple[bytes, bytes]],
    cold_ids: list[str] = (),
    stream_adapters: list[str | None] = (None,) * 8,
) -> tuple[float, float]:
    """(largest, median) inter-token gap in ms of running streams (one per `stream_adapters` entry)
    while `uploads` are published through the upload worker and the loader brings `cold_ids` in from
    disk (held as arriving requests would hold them)."""
    engine = runtime.engine
    stamps: dict[str, list[float]] = {f"s{i}": [] for i in range(len(stream_adapters))}
    finished: list[str] = []
    done = threading.Event()

    def sink_for(rid: str):
        def emit(event) -> None:
            stamps[rid].append(time.perf_counter())
            if event.finish_reason is not None:
                finished.append(rid)
                if len(finished) == len(stamps):
                    done.set()

        return emit

    engine.start()
    try:
        for i, (ids, adapter_id) in enumerate(zip(prompts(runtime, len(stamps)), stream_adapters)):
            version = None if adapter_id is None else runtime.adapters.resolve(adapter_id)
            params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
            engine.submit(
                Request(
                    f"s{i}",
                    ids,
                    params,
                    emit=sink_for(f"s{i}"),
                    adapter_version=version,
                    arrival_time=time.perf_counter(),
                )
            )
        # Every stream is decoding (past its prefill) before the loads and uploads start: a stream's
        # adapter may itself need a load first, and its prefill step is not a decode gap.
        deadline = time.perf_counter() + 120
        while min(len(s) for s in stamps.values()) < 2 and time.perf_counter() < deadline:
            time.sleep(0.01)
        background_start = time.perf_counter()
        held = [runtime.adapters.resolve(adapter_id) for adapter_id in cold_ids]
        pending = [runtime.adapters.submit_upload(f"during-{i}", *files) for i, files in enumerate(uploads)]
        for future in pending:
            future.result()
        for version in held:
            runtime.adapters.cache.wait_settled(version)
            runtime.adapters.cache.release(version)
        done.wait(timeout=600)
    finally:
        engine.stop()
    gaps = [b - a for s in stamps.values() for a, b in zip(s[1:], s[2:]) if a >= background_start]
    return max(gaps) * 1e3, statistics.median(gaps) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="round-robin runs per case (median reported)")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--requests", type=int, default=64, help="requests per residency run")
    parser.add_argument("--only", choices=["residency"], help="run only this part")
    parser.add_argument("--cold", type=int, default=1000, help="registered cold adapters (residency)")
    args = parser.parse_args()
    report_idle()
    one_core_for_torch()  # the main thread only sets up, as the server's HTTP thread
    work = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~3 GB of stored adapters


def run(args, work: Path) -> None:
    if args.only == "residency":
        print(f"torch {torch.__version__}, {on_fresh_thread(torch.get_num_threads)} engine threads, {args.dtype}")
        residency(args, work)
        return
    runtime = build_runtime(
        ServerConfig(
            model=args.model,
            dtype=args.dtype,
            adapters_dir=work / "store",
            engine=EngineConfig(max_model_len=256, max_num_seqs=16, kv_cache_gb=2),
            adapters=AdapterConfig(max_slots=16),
        )
    )
    print(
        f"torch {torch.__version__}, {on_fresh_thread(torch.get_num_threads)} engine threads, {args.dtype}, "
        f"{CONCURRENCY} concurrent, {args.tokens} new tokens"
    )
    lora8 = [lora_files(runtime, 16, QKVO, seed=i) for i in range(8)]
    for i, files in enumerate(lora8):
        runtime.adapters.upload(f"lora16-{i}", *files)
    ranks = [8, 8, 16, 16, 16, 24, 32, 32, 32, 40, 48, 48, 56, 64, 64, 64]
    for i, rank in enumerate(ranks):
        runtime.adapters.upload(f"mixed-{i}", *lora_files(runtime, rank, ALL if i % 2 else QKVO, seed=100 + i))
    stored = {"LoRA r16 qkvo": runtime.adapters.get("lora16-0").bytes}
    for i in range(8):  # one seed: all eight share one projection family
        stored["VeRA r256 qkvo"] = runtime.adapters.upload(
            f"vera-{i}", *vera_files(runtime, 256, QKVO, 0, 200 + i)
        ).bytes
        stored["RandLoRA r32 qkvo"] = runtime.adapters.upload(
            f"randlora-{i}", *randlora_files(runtime, 32, QKVO, 0, 300 + i)
        ).bytes

    batch = prompts(runtime, CONCURRENCY)
    on_fresh_thread(run_engine, runtime, batch[:2], 4)  # warm-up
    cases = {
        "(a) base only": [None] * CONCURRENCY,
        "(b) one LoRA r16 qkvo for all": ["lora16-0"] * CONCURRENCY,
        "(c) 8 LoRA r16 qkvo mixed": [f"lora16-{i % 8}" for i in range(CONCURRENCY)],
        "(d) 16 adapters r8-64 mixed": [f"mixed-{i}" for i in range(CONCURRENCY)],
        "(f) 8 VeRA r256 qkvo mixed (one seed)": [f"vera-{i % 8}" for i in range(CONCURRENCY)],
        "(g) 8 RandLoRA r32 qkvo mixed (one seed)": [f"randlora-{i % 8}" for i in range(CONCURRENCY)],
    }
    # Round-robin repeats, median per case: this machine drifts by ~10% between runs.
    runs: dict[str, list] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, ids in cases.items():
            runs[name].append(on_fresh_thread(run_engine, runtime, batch, args.tokens, ids))
    results = {name: sorted(r, key=lambda x: x.tok_s)[len(r) // 2] for name, r in runs.items()}
    dirs = [write_adapter_dir(work / f"peft-{i}", *files) for i, files in enumerate(lora8)]
    dtype = getattr(torch, args.dtype)
    peft_mixed = on_fresh_thread(
        peft_tok_s, args.model, dtype, dirs, [f"a{i % 8}" for i in range(CONCURRENCY)], batch, args.tokens
    )
    peft_base = on_fresh_thread(peft_tok_s, args.model, dtype, dirs, ["__base__"] * CONCURRENCY, batch, args.tokens)

    base = results["(a) base only"].tok_s
    rows = [
        [name, r.tok_s, r.tok_s / base, r.tok_s / peft_mixed, r.decode_step * 1e3, r.ttft * 1e3, r.tpot * 1e3]
        for name, r in results.items()
    ]
    rows.append(["(e) PEFT generate, 8 LoRA mixed", peft_mixed, peft_mixed / base, 1.0, "", "", ""])
    rows.append(["    PEFT generate, base (__base__)", peft_base, peft_base / base, peft_base / peft_mixed, "", "", ""])
    print_table(["case", "tok/s", "vs (a)", "vs (e)", "decode step ms", "TTFT ms", "TPOT ms"], rows)

    print_table(
        ["adapter (SmolLM2, q,k,v,o)", "stored bytes", "vs LoRA r16"],
        [[name, size, size / stored["LoRA r16 qkvo"]] for name, size in stored.items()],
    )
    uploads = [lora_files(runtime, 16, QKVO, seed=1000 + i) for i in range(20)]
    latency = upload_latency_ms(runtime, uploads)
    worst, median_gap = stream_gaps(
        runtime, max(args.tokens, 128), [lora_files(runtime, 16, QKVO, seed=2000 + i) for i in range(20)]
    )
    print_table(
        ["measure", "value"],
        [
            ["upload->ready, median of 20 (LoRA r16 qkvo, 7.4 MB)", f"{latency:.1f} ms"],
            ["8 streams during 20 uploads: largest inter-token gap", f"{worst:.1f} ms"],
            ["8 streams during 20 uploads: median inter-token gap", f"{median_gap:.1f} ms"],
            ["largest / median gap", f"{worst / median_gap:.2f}x"],
        ],
    )
    residency(args, work)


if __name__ == "__main__":
    main()
