"""Adapters converted to LoRA at several error targets: size, conversion time, fidelity, mixed throughput.

On SmolLM2 (float32), 8 RandLoRA r32 and 8 DoRA r16 adapters on q,k,v,o (the random "trained-looking"
adapters of benchmarks/adapters.py) are each converted to a LoRA by POST /adapters/{id}/convert's job
(`Converter.convert`, one core at low priority) at each `max_relative_error` target (whole adapter,
ranks allocated greedily, --max-lora-rank 256). Per kind and target:

* the chosen ranks (Σ over the 120 layers and the mean per layer, averaged over the 8 adapters), the
  median conversion time, the relative Frobenius error and the max logit difference of the report;
* greedy-token agreement with the original: 50 prompts of 32 tokens (prompt i on adapter i % 8),
  32 new tokens each; the fraction of positions whose token equals the original's, and the fraction
  of completions that are identical. Rows "original (rerun)" and "base model" give the noise floor
  (batching) and how far the adapters move the base model at all;
* the 8-adapter mixed throughput: 16 concurrent requests (2 per adapter), 32-token prompts, 64 new
  tokens, gathered mode, against the base model and the originals, measured round-robin (3 repeats,
  medians) in this same process, with the decode step compiled as the server runs it by default.

Prefix caching is off, so every repeat computes the same work.

Usage: python benchmarks/convert.py [--targets 0.7,0.5,0.35] [--prompts 50] [--tokens 32] [--repeats 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, report_idle  # noqa: E402
from benchmarks.workload import lora_files, prompts, randlora_files, run_engine  # noqa: E402
from server.adapters.conversion import Target  # noqa: E402
from server.config import AdapterConfig, EngineConfig, ServerConfig  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.engine.request import Request, SamplingParams  # noqa: E402
from server.runtime import Runtime, build_runtime  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
MIX = 8  # adapters per mix
CONCURRENCY = 16


def greedy_tokens(runtime: Runtime, batch: list[list[int]], adapter_ids: list[str | None], new_tokens: int):
    """Every prompt's greedy completion (exactly new_tokens), all submitted at once, the engine stepped by hand."""
    engine = runtime.engine
    outputs: list[list[int]] = [[] for _ in batch]
    for i, (ids, adapter_id) in enumerate(zip(batch, adapter_ids)):
        version = None if adapter_id is None else runtime.adapters.resolve(adapter_id)

        def emit(event, out=outputs[i]) -> None:
            out.extend(event.token_ids)

        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        engine.admit(
            Request(f"g{i}", ids, params, emit=emit, adapter_version=version, arrival_time=time.perf_counter())
        )
    while engine.scheduler.has_work():
        engine.step()
    return outputs


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(fraction of positions with the reference's token, fraction of identical completions)."""
    same = [sum(a == b for a, b in zip(x, y)) / len(y) for x, y in zip(ours, reference)]
    return statistics.mean(same), statistics.mean(float(x == y) for x, y in zip(ours, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--targets", default="0.7,0.5,0.35", help="max_relative_error targets")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per agreement prompt")
    parser.add_argument("--mix-tokens", type=int, default=64, help="new tokens per throughput request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode with the compiled step, as the server does by default (--no-compile: eager)",
    )
    args = parser.parse_args()
    report_idle()
    targets = [float(t) for t in args.targets.split(",")]
    runtime = build_runtime(
        ServerConfig(
            model=args.model,
            dtype="float32",
            adapters_dir=Path(tempfile.mkdtemp(prefix="convert-bench-")),
            engine=EngineConfig(
                max_model_len=256,
                max_num_seqs=CONCURRENCY,
                kv_cache_gb=2,
                prefix_caching=False,
                compile=args.compile,
            ),
            adapters=AdapterConfig(max_slots=CONCURRENCY),
        )
    )
    decode = "compiled" if runtime.engine.runner.fused is not None else "eager"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {decode} decode, {args.model.name}")
    converter = runtime.converter  # the server's own: reads the frozen base, one core, low priority
    makers = {
        "RandLoRA r32": lambda i: randlora_files(runtime, 32, QKVO, key=0, seed=300 + i),
        "DoRA r16": lambda i: lora_files(runtime, 16, QKVO, seed=400 + i, dora=True),
    }
    originals = {kind: [f"{kind.split()[0].lower()}-{i}" for i in range(MIX)] for kind in makers}
    for kind, make in makers.items():
        for i, adapter_id in enumerate(originals[kind]):
            runtime.adapters.upload(adapter_id, *make(i))

    # Conversions: every adapter at every target (the mix needs all 8).
    converted: dict[tuple[str, float], list[str]] = {}
    stats: dict[tuple[str, float], dict] = {}
    for kind in makers:
        for target in targets:
            ids, seconds, reports = [], [], []
            for adapter_id in originals[kind]:
                info = runtime.adapters.get(adapter_id)
                new_id = f"{adapter_id}-e{target}"
                result = converter.convert(info, new_id, Target(max_relative_error=target), info.tenant).result()
                ids.append(new_id)
                seconds.append(result.seconds)
                reports.append(result.report)
            converted[kind, target] = ids
            stats[kind, target] = {
                "rank_sum": statistics.mean(r["totals"]["rank_sum"] for r in reports),
                "rank_mean": statistics.mean(r["totals"]["rank_sum"] / r["totals"]["layers"] for r in reports),
                "seconds": statistics.median(seconds),
                "error": statistics.mean(r["totals"]["frobenius_error_rel"] for r in reports),
                "logit_diff": statistics.mean(r["logits"]["max_logit_diff"] for r in reports),
            }
            print(f"converted 8 x {kind} at max_relative_error {target}: {stats[kind, target]}", flush=True)

    # Agreement with the originals' greedy tokens.
    batch = prompts(runtime, args.prompts, 32)
    on = lambda ids: [ids[i % MIX] for i in range(len(batch))]  # noqa: E731
    run_engine(runtime, batch[:2], 4)  # warm-up
    base_tokens = greedy_tokens(runtime, batch, [None] * len(batch), args.tokens)
    fidelity: dict[tuple[str, str], tuple[float, float]] = {}
    for kind in makers:
        reference = greedy_tokens(runtime, batch, on(originals[kind]), args.tokens)
        fidelity[kind, "rerun"] = agreement(greedy_tokens(runtime, batch, on(originals[kind]), args.tokens), reference)
        fidelity[kind, "base"] = agreement(base_tokens, reference)
        for target in targets:
            tokens = greedy_tokens(runtime, batch, on(converted[kind, target]), args.tokens)
            fidelity[kind, str(target)] = agreement(tokens, reference)

    # Mixed throughput, round-robin.
    mix_batch = prompts(runtime, CONCURRENCY, 32)
    cases: dict[str, list[str | None]] = {"base": [None] * CONCURRENCY}
    for kind in makers:
        cases[f"{kind} original"] = [originals[kind][i % MIX] for i in range(CONCURRENCY)]
        for target in targets:
            cases[f"{kind} {target}"] = [converted[kind, target][i % MIX] for i in range(CONCURRENCY)]
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, ids in cases.items():
            runs[name].append(run_engine(runtime, mix_batch, args.mix_tokens, ids).tok_s)
    tok_s = {name: statistics.median(v) for name, v in runs.items()}

    base = tok_s["base"]
    rows: list[list[object]] = [["base model", "", "", "", "", "", "", "", "", base, 1.0, ""]]
    for kind in makers:
        original = tok_s[f"{kind} original"]
        pos, same = fidelity[kind, "rerun"]
        rows.append([f"{kind} original", "", "", "", "", "", pos, same, "", original, original / base, 1.0])
        pos, same = fidelity[kind, "base"]
        rows.append([f"  base model vs {kind}", "", "", "", "", "", pos, same, "", "", "", ""])
        for target in targets:
            s, t = stats[kind, target], tok_s[f"{kind} {target}"]
            pos, same = fidelity[kind, str(target)]
            rows.append(
                [f"{kind} -> LoRA", target, round(s["rank_sum"]), s["rank_mean"], s["seconds"], s["error"]]
                + [pos, same, s["logit_diff"], t, t / base, t / original]
            )
    print(
        f"{args.prompts} prompts x {args.tokens} greedy tokens for agreement; {CONCURRENCY} concurrent x "
        f"{args.mix_tokens} tokens for tok/s (median of {args.repeats} round-robin runs)"
    )
    print_table(
        ["adapter", "max rel. err", "rank Σ", "rank/layer", "convert s", "rel. F err", "token agr."]
        + ["identical", "max logit diff", "mix tok/s", "vs base", "vs original"],
        rows,
    )


if __name__ == "__main__":
    main()
