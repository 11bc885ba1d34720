"""Base-model throughput: our engine vs transformers `generate` vs the weight-matmul roofline.

For 1, 4 and 16 concurrent greedy requests (~32-token prompts, 64 new tokens, ignore_eos), in float32
and bfloat16, all measured in this one run. The roofline is the same weight matmuls one decode step
does (every layer's packed q/k/v, o, gate/up, down, plus lm_head), timed alone at that batch size.

Usage: python benchmarks/throughput.py [--dtypes float32,bfloat16] [--concurrency 1,4,16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median_seconds, print_table, report_idle  # noqa: E402
from benchmarks.workload import prompts, run_engine  # noqa: E402
from server.config import EngineConfig, ServerConfig  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.runtime import Runtime, build_runtime  # noqa: E402

NEW_TOKENS = 64


def run_transformers(hf_model, batch: list[list[int]]) -> float:
    ids = torch.tensor(batch)  # equal lengths: no padding needed
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=2,
        )
    assert out.shape[1] == ids.shape[1] + NEW_TOKENS
    return len(batch) * NEW_TOKENS / (time.perf_counter() - start)


def roofline_step_seconds(runtime: Runtime, batch_size: int) -> float:
    model = runtime.model
    weights = [lin.weight for lin in model.adapted_linears()]
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    inputs = {w.shape[1]: torch.randn(batch_size, w.shape[1], dtype=runtime.dtype) for w in weights}
    x_head = torch.randn(batch_size, head.shape[1], dtype=runtime.dtype)

    def step() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        F.linear(x_head, head)

    return median_seconds(step, repeats=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    args = parser.parse_args()
    from transformers import LlamaForCausalLM

    report_idle()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model.name}")
    rows = []
    for dtype in args.dtypes.split(","):
        runtime = build_runtime(
            ServerConfig(
                model=args.model,
                dtype=dtype,
                adapters_dir=Path(tempfile.mkdtemp()),
                engine=EngineConfig(max_model_len=256, max_num_seqs=16, kv_cache_gb=2),
            )
        )
        hf_model = LlamaForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype)).eval()
        run_engine(runtime, prompts(runtime, 2), NEW_TOKENS)  # warm-up
        for n in (int(c) for c in args.concurrency.split(",")):
            batch = prompts(runtime, n)
            ours = run_engine(runtime, batch, NEW_TOKENS)
            hf = run_transformers(hf_model, batch)
            roof = roofline_step_seconds(runtime, n)
            rows.append(
                [
                    dtype,
                    n,
                    ours.tok_s,
                    hf,
                    n / roof,
                    ours.tok_s / hf,
                    ours.decode_step * 1e3,
                    roof * 1e3,
                    ours.decode_step / roof,
                    ours.ttft * 1e3,
                    ours.tpot * 1e3,
                ]
            )
        del runtime, hf_model
    print_table(
        [
            "dtype",
            "conc",
            "engine tok/s",
            "transformers tok/s",
            "roofline tok/s",
            "engine/transformers",
            "decode step ms",
            "roofline step ms",
            "step/roofline",
            "TTFT ms",
            "TPOT ms",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
