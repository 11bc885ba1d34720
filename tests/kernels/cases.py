"""Kernel test cases shared by the interpreted Triton tests (tests/kernels/test_triton_ops.py) and the
CUDA tests (tests/test_cuda.py): case tables, their random inputs, and the tolerance check.

Pure torch: importing this never imports triton, so it cannot decide how triton is loaded.
"""

from __future__ import annotations

import torch

from kernels.segments import build_step_meta
from kernels.shared_bases import RandLoraSlice, RandLoraStack, VeraStack, randlora_u
from tests.kernels.helpers import adapter, slot_buffers, to_dtype

BF16_EPS = torch.finfo(torch.bfloat16).eps


def close(got: torch.Tensor, ref: torch.Tensor, y0: torch.Tensor, dtype: torch.dtype, delta_eps: float = 2) -> None:
    delta = (ref.float() - y0.float()).abs().max().item()
    assert delta > 0.1, "the adapters must change the output, else the check is vacuous"
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    else:
        err = (got.float() - ref.float()).abs()
        bound = BF16_EPS * ref.float().abs() + delta_eps * BF16_EPS * delta
        assert (err <= bound).all(), f"max err {err.max():.3g}, worst excess {(err - bound).max():.3g}"


# One combined grid: ranks {1, 8, 13, 64}, in/out {64, 576, 97}, packed q/k/v slices, layouts with one
# adapter, many, base (−1) rows interleaved, an empty segment, a single token; DoRA/bias; fp32 and bf16.
LORA_CASES = {
    "one-adapter-r8": dict(in_f=64, out_slices=[(0, 64)], ranks={0: 8}, groups=[(0, 0, 20)], T=20),
    "qkv-many-base-empty": dict(
        in_f=97,
        out_slices=[(0, 64), (64, 33), (97, 33)],
        ranks={0: 1, 1: 13, 2: 64, 3: 8},
        groups=[(0, 0, 3), (2, 4, 9), (1, 9, 9), (3, 10, 11), (1, 12, 19), (2, 20, 21)],
        T=22,
    ),
    "dora-bias-mixed": dict(
        in_f=97,
        out_slices=[(0, 97), (97, 64)],
        ranks={0: 13, 1: 8, 2: 64},
        groups=[(1, 0, 2), (0, 3, 6), (2, 6, 8)],
        T=9,
        mixed=True,
    ),
    "in576-single-token": dict(in_f=576, out_slices=[(0, 64)], ranks={1: 13}, groups=[(1, 0, 1)], T=1),
    "out576-bf16": dict(
        in_f=64, out_slices=[(0, 576)], ranks={0: 64, 2: 1}, groups=[(2, 0, 2), (0, 3, 5)], T=5, dtype=torch.bfloat16
    ),
    "qkv-many-bf16": dict(
        in_f=97,
        out_slices=[(0, 64), (64, 33), (97, 33)],
        ranks={0: 1, 1: 13, 2: 64},
        groups=[(0, 0, 3), (2, 4, 9), (1, 10, 10), (1, 11, 17)],
        T=18,
        dtype=torch.bfloat16,
        mixed=True,
    ),
}


def lora_setup(case: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = case.get("dtype", torch.float32)
    in_f, out_slices, T = case["in_f"], case["out_slices"], case["T"]
    adapters = {}
    for slot, rank in case["ranks"].items():
        mixed = case.get("mixed", False)
        kw = dict(dora=mixed and slot == 1, bias=mixed and slot == 2, scale=[2.0, 0.3, 0.7, 1.0][slot])
        only = [0] if (mixed and slot == 0 and len(out_slices) > 1) else None  # rank 0 on other projections
        adapters[slot] = to_dtype(adapter(out_slices, in_f, rank, gen, only=only, **kw), dtype)
    bufs = slot_buffers(in_f, out_slices, adapters, max_slots=5, max_rank=64, dtype=dtype, poison_padding=True)
    total = max(s + o for s, o in out_slices)
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    y0 = torch.randn(T, total, generator=gen).to(dtype)
    b0 = torch.randn(total, generator=gen).to(dtype)
    meta = build_step_meta(case["groups"], T, max_tokens=T + 3, max_segments=len(case["groups"]) + 2)
    return x, y0, b0, bufs, meta, dtype


def vera_setup(c: dict, seed: int = 2):
    """(x, y0, A_l, B, stack, token slots, rows of the family, adapted projections, dtype) of a VERA_CASES entry."""
    gen = torch.Generator().manual_seed(seed)
    dtype, r, T, outs = c["dtype"], c["r"], len(c["slots"]), c["outs"]
    out_slices, start = [], 7  # the layer's packed output starts at column 7 of y
    for size in outs:
        out_slices.append((start, size))
        start += size
    A_l = (torch.randn(r, c["in_f"], generator=gen) / c["in_f"] ** 0.5).to(dtype)
    B = (torch.randn(max(outs), r, generator=gen) / r**0.5).to(dtype)
    stack = VeraStack(out_slices, 4, r, dtype)
    adapted = out_slices[:-1] if len(out_slices) > 1 else out_slices
    for slot in range(4):
        for where in adapted[:1] if slot == 3 else adapted:
            stack.write(
                slot,
                where,
                (torch.rand(r, generator=gen) + 0.5).to(dtype),
                torch.randn(where[1], generator=gen).to(dtype),
            )
    x = torch.randn(T, c["in_f"], generator=gen).to(dtype)
    y0 = torch.randn(T, start + 5, generator=gen).to(dtype)
    slots = torch.tensor(c["slots"], dtype=torch.int32)
    rows = torch.nonzero(slots >= 0).flatten()
    return x, y0, A_l, B, stack, slots, rows, adapted, dtype


# VeRA: shared bases A_l [r, in], B [max out, r] (B_l of projection j = B[:out_j]); a VeraStack over the
# layer's packed projections, where slot 3 adapts only the first projection and, in the packed cases, no
# slot adapts the last one (inactive: no work, columns untouched).
VERA_CASES = {
    "r13-in97-out576-interleaved": dict(
        r=13, in_f=97, outs=[576], slots=[0, -1, 2, 2, -1, 1, 0, 3], dtype=torch.float32
    ),
    "r64-in576-out97-single": dict(r=64, in_f=576, outs=[97], slots=[2], dtype=torch.float32),
    "r8-qkv-packed": dict(r=8, in_f=64, outs=[64, 33, 33], slots=[1, 3, -1, 0, 0, 2, -1, 3], dtype=torch.float32),
    "r1-gate-up-packed": dict(r=1, in_f=97, outs=[97, 97], slots=[2, -1, 0], dtype=torch.float32),
    "r8-in64-out64-bf16": dict(r=8, in_f=64, outs=[64], slots=[1, 1, -1, 0, 3, 3, 3, -1, 2] * 2, dtype=torch.bfloat16),
    "r13-qkv-packed-bf16": dict(r=13, in_f=97, outs=[97, 64, 64], slots=[0, 3, 3, -1, 1, 2, 2], dtype=torch.bfloat16),
}


# RandLoRA: family bases A_l [r, 1, min], V [max, nb·r]; per-slot λ [r, nb], Γ [nb, min] (fp32), scale.
# The reference multiplies by each adapter's materialised U = λ ⊙ A_l ⊙ Γ (PEFT's form, what the torch path
# runs); the kernels never build U. bf16: the reference also rounds U itself (≤ eps/2 per entry), which moves
# δ by up to ~eps·|δ| more than the LoRA case, hence 3·eps·max|δ| instead of 2.
RANDLORA_CASES = {
    "in64-out97-r8-interleaved": dict(r=8, in_f=64, out=97, slots=[0, -1, 2, 2, -1, 1, 0, 3], dtype=torch.float32),
    "in97-out576-r13": dict(r=13, in_f=97, out=576, slots=[1, 1, 2, -1, 0], dtype=torch.float32),
    "in576-out64-r8-single": dict(r=8, in_f=576, out=64, slots=[2], dtype=torch.float32),
    "in97-out64-r1-interleaved": dict(r=1, in_f=97, out=64, slots=[-1, 3, 3, 0, -1, 2, 3], dtype=torch.float32),
    "in576-out97-r64": dict(r=64, in_f=576, out=97, slots=[0, 2, -1, 2], dtype=torch.float32),
    "in64-out64-r8-bf16": dict(r=8, in_f=64, out=64, slots=[1, 1, -1, 0, 3, 3, -1, 2] * 2, dtype=torch.bfloat16),
    "in97-out64-r13-bf16": dict(r=13, in_f=97, out=64, slots=[2, 0, 0, -1, 1], dtype=torch.bfloat16),
}


def randlora_setup(c: dict, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    dtype, r, in_f, out = c["dtype"], c["r"], c["in_f"], c["out"]
    min_l, max_l = min(in_f, out), max(in_f, out)
    nb = -(-min_l // r)
    A_l = (torch.randn(r, 1, min_l, generator=gen) / min_l**0.5).to(dtype)
    V = (torch.randn(max_l, nb * r, generator=gen) / (nb * r) ** 0.5).to(dtype)
    stack = RandLoraStack.empty(4, r, nb, min_l, in_le_out=in_f <= out)
    pieces = {}
    for slot in range(4):
        lam, gamma = torch.rand(r, nb, generator=gen) + 0.5, torch.randn(nb, min_l, generator=gen)
        scale = [0.5, 2.0, 0.75, 1.0][slot]
        stack.write(slot, lam, gamma, scale)
        pieces[slot] = RandLoraSlice(randlora_u(lam, gamma, A_l).to(dtype), scale)  # as the RandLoRA store builds it
    return gen, dtype, A_l, V, stack, pieces
