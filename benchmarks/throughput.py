"""Decode at the hardware limit: our engine, eager and compiled, against the weight-matmul roofline.

Per dtype, one runtime whose decode step is compiled at startup (the compile time is printed). Cases:
base model only, and 8 LoRA r16 q,k,v,o adapters mixed (concurrency / 8 requests each); concurrency 16
and 64; each in eager mode (the compiled step switched off: the baseline, in the same process) and
compiled. Greedy, 32-token prompts, 64 new tokens, ignore_eos, round-robin repeats, medians. The
roofline is the same weight matmuls as one decode step (every layer's packed q/k/v, o, gate/up and
down, plus the LM head), timed alone at that batch size. transformers `generate` on the base model is
the outside reference at the first concurrency.

Usage: python benchmarks/throughput.py [--dtypes float32,bfloat16] [--concurrency 16,64] [--repeats 3]
       [--device cpu|cuda] [--random-weights] [--no-transformers]
--random-weights: the demo model's shapes with random weights (benchmarks/random_model.py), for machines
without its files (scripts/gpu_check.sh).
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
from benchmarks.random_model import write_random_model  # noqa: E402
from benchmarks.workload import lora_files, prompts, run_engine  # noqa: E402
from server.config import AdapterConfig, EngineConfig, ServerConfig  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.runtime import Runtime, build_runtime  # noqa: E402

NEW_TOKENS = 64
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
MIX = 8  # distinct LoRA adapters in the mixed case


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_transformers(model_dir: Path, dtype: torch.dtype, device: torch.device, batch: list[list[int]]) -> float:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor(batch, device=device)  # equal lengths: no padding needed

    def generate(ids: torch.Tensor, tokens: int) -> torch.Tensor:
        mask = torch.ones_like(ids)
        return hf.generate(
            ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=2
        )

    with torch.inference_mode():
        generate(ids[:2], 4)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = generate(ids, NEW_TOKENS)
        sync(device)
    assert out.shape[1] == ids.shape[1] + NEW_TOKENS
    return len(batch) * NEW_TOKENS / (time.perf_counter() - start)


def roofline_step_seconds(runtime: Runtime, batch_size: int) -> float:
    model, device = runtime.model, runtime.device
    weights = [lin.weight for lin in model.adapted_linears()]
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    inputs = {w.shape[1]: torch.randn(batch_size, w.shape[1], dtype=runtime.dtype, device=device) for w in weights}
    x_head = torch.randn(batch_size, head.shape[1], dtype=runtime.dtype, device=device)

    def step() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        F.linear(x_head, head)
        sync(device)

    return median_seconds(step, repeats=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin runs per case (median reported)")
    parser.add_argument("--tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--random-weights", action="store_true", help="the demo model's shapes, random weights")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers reference")
    args = parser.parse_args()
    report_idle()
    if args.random_weights:
        args.model = write_random_model(Path(tempfile.mkdtemp(prefix="random-model-")))
    concurrency = [int(c) for c in args.concurrency.split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, model {args.model.name}"
        f"{' (random weights)' if args.random_weights else ''}, {args.tokens} new tokens, {args.repeats} repeats"
    )
    rows, notes = [], []
    for dtype in args.dtypes.split(","):
        runtime = build_runtime(
            ServerConfig(
                model=args.model,
                device=args.device,
                dtype=dtype,
                adapters_dir=Path(tempfile.mkdtemp()),
                engine=EngineConfig(max_model_len=256, max_num_seqs=max(concurrency), kv_cache_gb=2, compile=True),
                adapters=AdapterConfig(max_slots=16),
            )
        )
        runner = runtime.engine.runner
        fused = runner.fused
        if fused is None:
            notes.append(f"{dtype}: compiling failed (see the log): the compiled rows ran eagerly")
        else:
            seconds, variants = fused.report.seconds, ", ".join(fused.report.variants)
            notes.append(f"{dtype}: decode step compiled at startup in {seconds:.1f} s ({variants})")
        for i in range(MIX):
            runtime.adapters.upload(f"lora-{i}", *lora_files(runtime, 16, QKVO, seed=i))
        run_engine(runtime, prompts(runtime, 2), 4, ["lora-0", None])  # warm-up: slot loads, first steps
        cases = {"base": lambda n: None, f"{MIX} LoRA r16 qkvo": lambda n: [f"lora-{i % MIX}" for i in range(n)]}
        runs: dict[tuple, list] = {}
        for _ in range(args.repeats):
            for n in concurrency:
                batch = prompts(runtime, n)
                for case, ids in cases.items():
                    for mode in ("eager", "compiled"):
                        runner.fused = fused if mode == "compiled" else None
                        runs.setdefault((n, case, mode), []).append(run_engine(runtime, batch, args.tokens, ids(n)))
        runner.fused = fused
        results = {key: sorted(r, key=lambda x: x.tok_s)[len(r) // 2] for key, r in runs.items()}
        spread = max(max(r.tok_s for r in v) / min(r.tok_s for r in v) for v in runs.values())
        notes.append(f"{dtype}: largest max/min tok/s of one case over its runs: {spread:.2f}x")
        for n in concurrency:
            roof = roofline_step_seconds(runtime, n)
            for case in cases:
                for mode in ("eager", "compiled"):
                    r = results[(n, case, mode)]
                    base = results[(n, "base", mode)]
                    rows.append(
                        [
                            dtype,
                            n,
                            case,
                            mode,
                            r.tok_s,
                            r.decode_step * 1e3,
                            roof * 1e3,
                            r.decode_step / roof,
                            r.tok_s / results[(n, case, "eager")].tok_s,
                            r.tok_s / base.tok_s,
                            r.tpot * 1e3,
                        ]
                    )
        if not args.no_transformers:
            batch = prompts(runtime, concurrency[0])
            hf = run_transformers(args.model, runtime.dtype, runtime.device, batch)
            notes.append(f"{dtype}: transformers generate, base, {concurrency[0]} concurrent: {hf:.1f} tok/s")
        del runtime, runner, fused
        print(f"{dtype} done", flush=True)
    print_table(
        [
            "dtype",
            "conc",
            "adapters",
            "decode",
            "tok/s",
            "step ms",
            "roofline ms",
            "step/roofline",
            "vs eager",
            "vs base",
            "TPOT ms",
        ],
        rows,
    )
    for note in notes:
        print(note)
    print("step: median decode step with every request running; roofline: the bare weight matmuls of that step")
    print(f"tok/s and step: medians of {args.repeats} round-robin runs")


if __name__ == "__main__":
    main()
