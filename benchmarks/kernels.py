"""Gathered LoRA on one packed q/k/v layer: Triton kernels vs the torch reference vs a naive loop.

  naive     — per distinct adapter: boolean-mask gather of its tokens (batch order, not grouped),
              (x Aᵀ) Bᵀ · s per projection, index_add back. What one writes without a step plan.
  torch-ref — the server's eager path: tokens grouped by slot, `kernels.batch.LoraRows` (PEFT's op order
              per group; on a CPU in bf16 computed in float32).
  compiled  — the compiled decode step's form (`kernels.lora_tokens`: every token gathers its slot from
              stacked buffers), under torch.compile alone; decode rows, CPU.
  triton    — `kernels.lora_triton.lora_apply` on slot buffers: token form at decode, segment form at
              prefill (metadata built once per step, outside the timing, like the runner does).
GPU: decode batch 1–256 tokens; prefill: 512–8192 tokens in 4 requests' segments; 1–64 distinct adapters,
ranks 8–64 (the "8-64" row mixes them); hidden 4096 with q/k/v = 4096/1024/1024 columns, bf16.
CPU: SmolLM2's q/k/v (576 → 576/192/192), ranks 16 and 64, fp32 and bf16; no Triton rows.

Usage: python benchmarks/kernels.py [--repeats 10]
       TRITON_INTERPRET=1 python benchmarks/kernels.py --interpret --repeats 1   (GPU code path check on a CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median_seconds, print_table, report_idle  # noqa: E402
from kernels.batch import LoraRows, TokenGroup  # noqa: E402
from kernels.lora import LinearFactors, SliceFactors  # noqa: E402
from kernels.lora_tokens import TokenLoraStack, lora_tokens  # noqa: E402
from kernels.segments import alloc_slot_buffers, build_step_meta, write_slot  # noqa: E402

CUDA = torch.cuda.is_available()


def make_adapters(
    n: int, ranks: list[int], hidden: int, out_slices: list[tuple[int, int]], dtype: torch.dtype, device: str
) -> list[LinearFactors]:
    gen = torch.Generator().manual_seed(0)
    adapters = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        slices = [
            SliceFactors(
                start,
                size,
                (torch.randn(r, hidden, generator=gen) / hidden**0.5).to(device, dtype),
                (torch.randn(r, size, generator=gen) / r**0.5).to(device, dtype),
                2.0,
            )
            for start, size in out_slices
        ]
        adapters.append(LinearFactors(slices))
    return adapters


def naive(x: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, adapters: list[LinearFactors]) -> None:
    for slot, factors in enumerate(adapters):
        rows = torch.nonzero(token_slots == slot).flatten()
        if rows.numel() == 0:
            continue
        xs = x.index_select(0, rows)
        for s in factors.slices:
            delta = (xs @ s.A.T) @ s.Bt * s.scale
            y[:, s.out_start : s.out_start + s.out_features].index_add_(0, rows, delta)


def torch_ref(
    x: torch.Tensor, y: torch.Tensor, groups: list[tuple[int, int, int]], adapters: list[LinearFactors]
) -> None:
    """The server's torch path (`kernels.batch.LoraRows`: `lora_rows_ref` per group, in float32 for bf16 on
    a CPU)."""
    plan = LoraRows([TokenGroup(*g) for g in groups], [{"qkv": f} for f in adapters])
    plan.apply(SimpleNamespace(key="qkv", bias=None), x, y)


def layout(tokens: int, n_adapters: int, phase: str) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Per-token slots in batch order (naive) and the grouped form (torch-ref, Triton): the same work."""
    if phase == "decode":  # requests of the adapters interleaved, as they arrive
        slots = torch.arange(tokens) % n_adapters
    else:  # 4 prompts (or fewer) per adapter group, contiguous segments
        n_seg = max(4, n_adapters)
        slots = (torch.arange(tokens) * n_seg // tokens) % n_adapters
    order = torch.argsort(slots, stable=True)
    grouped = slots[order]
    groups, start = [], 0
    for slot in grouped.unique_consecutive().tolist():
        end = start + int((grouped == slot).sum())
        groups.append((slot, start, end))
        start = end
    return slots, groups


def compiled_tokens(x: torch.Tensor, y: torch.Tensor, groups, adapters: list[LinearFactors], out_slices):
    """The compiled decode step's LoRA op (`kernels.lora_tokens`, token form over stacked slots), compiled
    alone, after checking it equals the reference; returns the timed call."""
    layer = SimpleNamespace(
        key="qkv", in_features=x.shape[1], slices=[SimpleNamespace(out_start=a, out_features=b) for a, b in out_slices]
    )
    stack = TokenLoraStack([layer], len(adapters), x.dtype, x.device)
    stack.sync([{"qkv": f} for f in adapters])
    slots = torch.full((x.shape[0],), stack.empty_slot)
    for slot, start, end in groups:
        slots[start:end] = slot
    idx = stack.token_index(slots.to(x.device))[0]
    args = (x, y, idx, *stack.layers["qkv"].tensors(), [size for _, size in out_slices])
    op = torch.compile(lora_tokens, dynamic=True)
    expected = y.clone()
    torch_ref(x, expected, groups, adapters)
    tolerance = 1e-4 if x.dtype == torch.float32 else 3 * torch.finfo(x.dtype).eps * float(expected.abs().max())
    assert (op(*args).float() - expected.float()).abs().max() <= tolerance, "compiled token form != reference"
    return lambda: op(*args)


def run_case(
    phase: str,
    tokens: int,
    n_adapters: int,
    ranks: list[int],
    hidden: int,
    out_slices,
    dtype,
    device,
    repeats: int,
    with_triton: bool,
) -> list[object]:
    adapters = make_adapters(n_adapters, ranks, hidden, out_slices, dtype, device)
    total = max(s + o for s, o in out_slices)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    y = torch.zeros(tokens, total, device=device, dtype=dtype)
    slots, groups = layout(tokens, n_adapters, phase)
    slots_dev = slots.to(device)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def timed(fn) -> float:
        return median_seconds(lambda: (fn(), sync()), repeats) * 1e3

    t_naive = timed(lambda: naive(x, y, slots_dev, adapters))
    t_ref = timed(lambda: torch_ref(x, y, groups, adapters))
    row = [str(dtype).removeprefix("torch."), phase, tokens, n_adapters, "-".join(map(str, sorted(set(ranks))))]
    row += [t_naive, t_ref]
    if not with_triton:
        t_tokens = timed(compiled_tokens(x, y, groups, adapters, out_slices)) if phase == "decode" else None
        return row + ["n/a" if t_tokens is None else t_tokens, "n/a", t_naive / t_ref]
    from kernels import lora_triton

    bufs = alloc_slot_buffers(hidden, out_slices, n_adapters, max(ranks), dtype, device)
    for slot, factors in enumerate(adapters):
        write_slot(bufs, slot, factors)
    meta = build_step_meta(groups, tokens, device=device)
    h = lora_triton.alloc_shrink_buffer(bufs, tokens)
    form = "tokens" if phase == "decode" else "segments"
    # Time only what computes the same thing: the Triton delta must equal the reference's first.
    expected, got = torch.zeros_like(y), torch.zeros_like(y)
    torch_ref(x, expected, groups, adapters)
    lora_triton.lora_apply(x, got, bufs, meta, h, form)
    tolerance = 1e-4 if dtype == torch.float32 else 3 * torch.finfo(dtype).eps * float(expected.abs().max())
    assert (got.float() - expected.float()).abs().max() <= tolerance, f"{phase} {tokens} {n_adapters}: triton != ref"
    t_triton = timed(lambda: lora_triton.lora_apply(x, y, bufs, meta, h, form))
    return row + ["n/a", t_triton, t_naive / t_ref]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="also run the Triton rows on the CPU under TRITON_INTERPRET=1 at the small sizes: checks "
        "the GPU code path end to end (its timings mean nothing)",
    )
    args = parser.parse_args()
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--interpret needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    report_idle()
    if CUDA:
        device, dtype, hidden = "cuda", torch.bfloat16, 4096
        out_slices = [(0, 4096), (4096, 1024), (5120, 1024)]
        decode, prefill, counts = [1, 16, 64, 256], [512, 2048, 8192], [1, 8, 64]
        rank_sets = [[8], [64], [8, 16, 32, 64]]
    else:
        device, dtype, hidden = "cpu", torch.float32, 576
        out_slices = [(0, 576), (576, 192), (768, 192)]  # SmolLM2's packed q/k/v
        decode, prefill, counts = [1, 16, 64], [512], [1, 8]
        rank_sets = [[16], [64]]
        print(
            "no CUDA device: the Triton rows need a GPU; showing naive vs torch-ref vs the compiled decode step's "
            f"token form (decode rows) at SmolLM2's q/k/v sizes (hidden {hidden}), fp32 and bf16"
        )
    dtypes = [dtype] if CUDA or args.interpret else [torch.float32, torch.bfloat16]
    rows = []
    for dt in dtypes:
        for phase, sizes in (("decode", decode), ("prefill", prefill)):
            for tokens in sizes:
                for n in counts:
                    if n > tokens:
                        continue
                    for ranks in rank_sets:
                        rows.append(
                            run_case(
                                phase,
                                tokens,
                                n,
                                ranks,
                                hidden,
                                out_slices,
                                dt,
                                device,
                                args.repeats,
                                with_triton=CUDA or args.interpret,
                            )
                        )
    print_table(
        ["dtype", "phase", "tokens", "adapters", "rank", "naive ms", "torch-ref ms", "compiled ms", "triton ms"]
        + ["naive/ref"],
        rows,
    )
    print("compiled: kernels.lora_tokens under torch.compile (decode only); triton: CUDA only")


if __name__ == "__main__":
    main()
