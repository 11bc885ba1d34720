"""Random adapter factors and layouts shared by the kernel tests (small sizes: the interpreter is slow)."""

from __future__ import annotations

import torch

from kernels.lora import LinearFactors, SliceFactors
from kernels.segments import SlotBuffers, alloc_slot_buffers, write_slot


def lora_slice(
    out_start: int,
    out_f: int,
    in_f: int,
    rank: int,
    gen: torch.Generator,
    *,
    scale: float = 0.5,
    divisor: float = 1.0,
    bias: bool = False,
    dora: bool = False,
) -> SliceFactors:
    """Factors scaled so the delta is O(1): errors are then absolute errors of O(1) numbers."""
    A = torch.randn(rank, in_f, generator=gen) / in_f**0.5
    B = torch.randn(out_f, rank, generator=gen) / rank**0.5
    return SliceFactors(
        out_start,
        out_f,
        A,
        B.T.contiguous(),
        scale,
        divisor,
        bias=torch.randn(out_f, generator=gen) * scale if bias else None,
        output_scale=torch.rand(out_f, generator=gen) + 0.5 if dora else None,
    )


def adapter(
    out_slices: list[tuple[int, int]],
    in_f: int,
    rank: int,
    gen: torch.Generator,
    *,
    only: list[int] | None = None,
    **kw,
) -> LinearFactors:
    """One adapter of one packed layer; `only` = indices of the projections it adapts (default all)."""
    picked = range(len(out_slices)) if only is None else only
    return LinearFactors([lora_slice(*out_slices[j], in_f, rank, gen, **kw) for j in picked])


def to_dtype(factors: LinearFactors, dtype: torch.dtype) -> LinearFactors:
    conv = lambda t: None if t is None else t.to(dtype)
    return LinearFactors(
        [
            SliceFactors(
                s.out_start,
                s.out_features,
                s.A.to(dtype),
                s.Bt.to(dtype),
                s.scale,
                s.divisor,
                conv(s.bias),
                conv(s.output_scale),
            )
            for s in factors.slices
        ]
    )


def slot_buffers(
    in_f: int,
    out_slices: list[tuple[int, int]],
    adapters: dict[int, LinearFactors],
    max_slots: int,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    poison_padding: bool = False,
) -> SlotBuffers:
    with_bias = any(s.bias is not None for f in adapters.values() for s in f.slices)
    with_dora = any(s.output_scale is not None for f in adapters.values() for s in f.slices)
    bufs = alloc_slot_buffers(in_f, out_slices, max_slots, max_rank, dtype, with_bias=with_bias, with_dora=with_dora)
    for slot, f in adapters.items():
        write_slot(bufs, slot, f)
    if poison_padding:  # NaN beyond each slot's rank: any read past slot_ranks shows up in the output
        for j in range(len(out_slices)):
            for s in range(max_slots):
                r = int(bufs.slot_ranks[j, s])
                start, size = out_slices[j]
                bufs.A_buf[j, s, r:] = float("nan")
                bufs.B_buf[s, start : start + size, r:] = float("nan")
    return bufs
