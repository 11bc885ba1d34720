"""What batch invariance costs: throughput with and without --batch-invariant, in one run.

16 concurrent greedy requests (32-token prompts, --new-tokens each, ignore_eos) on the demo model, base
model only and an 8-LoRA mix (rank 16 on every projection, two requests per adapter), float32 and
bfloat16. The same runtime serves both settings (the runner's switch is flipped between runs), and the
settings alternate round-robin so background load hits both alike; each cell is the median of the runs
(after one short warm-up run of each setting: adapter slots, allocator). Rows print as they finish.

--compile takes the compiled decode step (the CLI default) as the baseline instead of the eager path.

Usage: python benchmarks/invariance.py [--dtypes float32,bfloat16] [--repeats 3] [--new-tokens 64] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, report_idle  # noqa: E402
from benchmarks.workload import lora_files, prompts, run_engine  # noqa: E402
from server.config import EngineConfig, ServerConfig  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.runtime import build_runtime  # noqa: E402

CONCURRENCY, ADAPTERS = 16, 8
HEADERS = ["dtype", "workload", "tok/s default", "tok/s invariant", "cost", "decode step ms", "invariant step ms"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="baseline: the compiled decode step (server default)")
    args = parser.parse_args()
    report_idle()
    rows = []
    for dtype in args.dtypes.split(","):
        config = ServerConfig(
            model=DEMO_MODEL_DIR,
            dtype=dtype,
            adapters_dir=Path(tempfile.mkdtemp()),
            engine=EngineConfig(
                max_model_len=256, max_num_seqs=CONCURRENCY, kv_cache_gb=0.5, prefix_caching=False, compile=args.compile
            ),
        )
        runtime = build_runtime(config)
        for i in range(ADAPTERS):
            runtime.adapters.upload(f"mix{i}", *lora_files(runtime, 16, TARGETS, seed=i))
        batch = prompts(runtime, CONCURRENCY)
        workloads = {"base": None, f"{ADAPTERS}-LoRA mix": [f"mix{i % ADAPTERS}" for i in range(CONCURRENCY)]}
        for name, adapter_ids in workloads.items():
            samples: dict[bool, list] = {False: [], True: []}
            for invariant in (False, True):
                runtime.engine.runner.batch_invariant = invariant
                run_engine(runtime, batch, 4, adapter_ids)  # warm-up
            for _ in range(args.repeats):
                for invariant in (False, True):
                    runtime.engine.runner.batch_invariant = invariant
                    samples[invariant].append(run_engine(runtime, batch, args.new_tokens, adapter_ids))
            tok_s = {k: statistics.median(r.tok_s for r in v) for k, v in samples.items()}
            step_ms = {k: 1000 * statistics.median(r.decode_step for r in v) for k, v in samples.items()}
            cost = 1 - tok_s[True] / tok_s[False]
            rows.append([dtype, name, tok_s[False], tok_s[True], f"{cost:.1%}", step_ms[False], step_ms[True]])
            print(rows[-1], flush=True)
    baseline = "compiled decode step" if args.compile else "eager"
    print(f"{CONCURRENCY} concurrent requests, {args.new_tokens} new tokens each; medians of {args.repeats} runs")
    print(f"default = {baseline}; invariant = eager with --batch-invariant (a runtime built with it compiles nothing)")
    print_table(HEADERS, rows)


if __name__ == "__main__":
    main()
