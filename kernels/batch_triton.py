"""The Triton-backend parts of a step plan: the twins of `kernels.batch`'s torch parts.

Imports triton (via the kernel modules), so only the "triton" backend imports this module. Each part
holds every tensor its launches read; the step's metadata and scratch live in the `StepBuffers`
(allocated once at startup, filled once per step, shared by every layer):
  LoRA / rsLoRA / AdaLoRA / DoRA (`LoraSlots`): one shrink + expand launch pair per layer for all of the
    step's adapters, q/k/v (gate/up) as slices of the same launch; the token form for decode-only
    steps, the segment form when a prefill chunk is in the step;
  VeRA (`VeraTokens`): one shared shrink and one expand launch per projection family and packed layer;
  RandLoRA (`RandLoraTokens`): the factored λ/Γ-gathering kernels, once per projection family and projection.
"""

from __future__ import annotations

import torch

from kernels.batch import LinearLike, ProjectionFamilyRows, StepInputs, TokenGroup
from kernels.lora_triton import lora_apply
from kernels.segments import StepBuffers
from kernels.shared_bases import RandLoraProjection, VeraLayer
from kernels.shared_bases_triton import randlora_apply, vera_apply
from kernels.slot_store import LoraSlotStore


class LoraSlots:
    __slots__ = ("slots", "buffers", "meta", "form")

    def __init__(self, groups: list[TokenGroup], slots: LoraSlotStore, step: StepInputs) -> None:
        self.slots = slots
        self.buffers = step.buffers
        self.form = "tokens" if step.decode_only else "segments"
        # Once per step, shared by every layer: the LoRA-family grouping.
        self.meta = step.buffers.fill_meta([(g.slot, g.start, g.end) for g in groups], step.num_tokens)

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bufs = self.slots.get(layer.key)
        if bufs is not None:
            h = self.buffers.lora_scratch(len(bufs.out_slices), bufs.max_rank)
            lora_apply(x, y, bufs, self.meta, h, self.form, base_bias=layer.bias)
        return y


def _token_slots(rows: ProjectionFamilyRows, step: StepInputs) -> torch.Tensor:
    """This projection family's token→slot row of the step buffers, over its span of rows only (a VeRA
    projection family decoding inside a long prefill step launches over its few rows, not all of them);
    rows in the span outside the projection family are −1. Once per step and projection family."""
    index = step.projection_families
    step.projection_families += 1
    slots = step.buffers.fill_projection_family(index, rows.rows, rows.token_slots, step.num_tokens)
    return slots[rows.span[0] : rows.span[1]]


class VeraTokens:
    __slots__ = ("span", "token_slots", "layers", "buffers")

    def __init__(self, rows: ProjectionFamilyRows, layers: dict[str, VeraLayer], step: StepInputs) -> None:
        self.span = slice(*rows.span)
        self.token_slots = _token_slots(rows, step)
        self.layers = layers
        self.buffers: StepBuffers = step.buffers

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        vera = self.layers.get(layer.key)
        if vera is not None:
            h = self.buffers.projection_scratch(vera.A_l.shape[0])
            vera_apply(x[self.span], y[self.span], vera.A_l, vera.B, vera.stack, self.token_slots, h)
        return y


class RandLoraTokens:
    __slots__ = ("span", "token_slots", "layers", "buffers")

    def __init__(
        self, rows: ProjectionFamilyRows, layers: dict[str, dict[tuple[int, int], RandLoraProjection]], step: StepInputs
    ) -> None:
        self.span = slice(*rows.span)
        self.token_slots = _token_slots(rows, step)
        self.layers = layers
        self.buffers: StepBuffers = step.buffers

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for proj in self.layers.get(layer.key, {}).values():
            h = self.buffers.projection_scratch(proj.V.shape[1])
            randlora_apply(
                x[self.span], y[self.span], proj.A_l, proj.V, proj.stack, self.token_slots, proj.out_start, h
            )
        return y
