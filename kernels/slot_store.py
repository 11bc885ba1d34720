"""Per-layer `SlotBuffers` of every loaded LoRA-family adapter: what the Triton LoRA ops read.

Pure torch (never imports triton), so the torch backend can import this module for free. Buffers are
allocated per AdaptedLinear when the first adapter that targets it is loaded, with room for rank 64
and no bias/DoRA planes; they grow (copying the live slots) only when a bigger rank, a lora bias or a
DoRA adapter arrives. Growing is a rare load-time cost, so steps never allocate slot storage, and an
adapter's rank never has to fit a size decided before it was uploaded.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kernels.lora import LinearFactors
from kernels.segments import SlotBuffers, alloc_slot_buffers, clear_slot, write_slot

INITIAL_MAX_RANK = 64


class LayerLike(Protocol):
    """What the store needs of an AdaptedLinear (its slices carry out_start/out_features)."""

    key: str
    in_features: int
    slices: list


def _needs(factors: LinearFactors) -> tuple[int, bool, bool]:
    rank = max((s.rank for s in factors.slices), default=0)
    bias = any(s.bias is not None for s in factors.slices)
    dora = any(s.output_scale is not None for s in factors.slices)
    return rank, bias, dora


def _grown(old: SlotBuffers, in_features: int, max_rank: int, with_bias: bool, with_dora: bool) -> SlotBuffers:
    """A larger copy of `old`: same slots, ranks, scales; rank padding and new planes are zero (g = 1)."""
    A = old.A_buf
    new = alloc_slot_buffers(
        in_features, old.out_slices, A.shape[1], max_rank, A.dtype, A.device, with_bias=with_bias, with_dora=with_dora
    )
    r = old.max_rank
    new.A_buf[:, :, :r].copy_(old.A_buf)
    new.B_buf[:, :, :r].copy_(old.B_buf)
    new.slot_ranks.copy_(old.slot_ranks)
    new.slot_scales.copy_(old.slot_scales)
    if old.bias_buf is not None:
        new.bias_buf.copy_(old.bias_buf)
    if old.g_buf is not None:
        new.g_buf.copy_(old.g_buf)
    return new


class LoraSlotStore:
    """layer key -> SlotBuffers over `num_slots` adapter slots, in the model dtype on `device`."""

    def __init__(self, layers: list[LayerLike], num_slots: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.layers = {layer.key: layer for layer in layers}
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = device
        self.buffers: dict[str, SlotBuffers] = {}

    def get(self, layer_key: str) -> SlotBuffers | None:
        return self.buffers.get(layer_key)

    def write(self, slot: int, factors: dict[str, LinearFactors]) -> None:
        """Load one LoRA-family adapter into `slot` of every layer (layers it skips get rank 0 there)."""
        for key, bufs in self.buffers.items():
            if key not in factors:
                clear_slot(bufs, slot)
        for key, linear_factors in factors.items():
            write_slot(self._ensure(key, linear_factors), slot, linear_factors)

    def clear(self, slot: int) -> None:
        for bufs in self.buffers.values():
            clear_slot(bufs, slot)

    def _ensure(self, key: str, factors: LinearFactors) -> SlotBuffers:
        rank, bias, dora = _needs(factors)
        bufs = self.buffers.get(key)
        layer = self.layers[key]
        if bufs is None:
            out_slices = [(s.out_start, s.out_features) for s in layer.slices]
            max_rank = max(INITIAL_MAX_RANK, _next_pow2(rank))
            bufs = alloc_slot_buffers(
                layer.in_features,
                out_slices,
                self.num_slots,
                max_rank,
                self.dtype,
                self.device,
                with_bias=bias,
                with_dora=dora,
            )
        elif rank > bufs.max_rank or (bias and bufs.bias_buf is None) or (dora and bufs.g_buf is None):
            bufs = _grown(
                bufs,
                layer.in_features,
                max(bufs.max_rank, _next_pow2(rank)),
                bias or bufs.bias_buf is not None,
                dora or bufs.g_buf is not None,
            )
        self.buffers[key] = bufs
        return bufs


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
