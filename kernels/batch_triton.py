"""The Triton-backend AdapterBatch: every adapter kind of a step through the Triton ops.

Imports triton (via the kernel modules), so only the "triton" backend imports this module. Same plan as
`AdapterBatch` (same groups and families, built by AdapterManager.plan); what differs is where the
work goes:
  LoRA / rsLoRA / AdaLoRA / DoRA: one shrink + expand launch pair per layer for all of the step's
    adapters, q/k/v (gate/up) as slices of the same launch; the token form for decode-only steps, the
    segment form when a prefill chunk is in the step;
  VeRA: one shared shrink and one expand launch per family and packed layer (all its projections);
  RandLoRA: the factored λ/Γ-gathering kernels, once per family and projection.
The step's metadata and scratch live in the manager's `StepBuffers` (allocated once, filled per step).
"""

from __future__ import annotations

import torch

from kernels.batch import AdapterBatch, FamilyLayers, FamilyRows, LinearLike, TokenGroup
from kernels.lora import LinearFactors
from kernels.lora_triton import lora_apply
from kernels.segments import StepBuffers
from kernels.shared_bases_triton import randlora_apply, vera_apply
from kernels.slot_store import LoraSlotStore


class TritonAdapterBatch(AdapterBatch):
    def __init__(self, groups: list[TokenGroup], families: list[FamilyRows],
                 slot_factors: list[dict[str, LinearFactors] | None], family_layers: FamilyLayers,
                 slots: LoraSlotStore, buffers: StepBuffers, num_tokens: int, decode_only: bool) -> None:
        super().__init__(groups, families, slot_factors, family_layers)
        self.slots = slots
        self.buffers = buffers
        self.form = "tokens" if decode_only else "segments"
        # Once per step, shared by every layer: the LoRA grouping and each family's token→slot row.
        self.meta = buffers.fill_meta([(g.slot, g.start, g.end) for g in groups], num_tokens) if groups else None
        # Each family's kernels cover only its span of rows (a VeRA decode family inside a long prefill
        # step launches over its few rows, not all of them); rows in the span outside the family are −1.
        self.token_slots = {f.key: buffers.fill_family(i, f.rows, f.token_slots, num_tokens)[f.span[0]:f.span[1]]
                            for i, f in enumerate(families)}

    def _lora(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> None:
        bufs = self.slots.get(layer.key) if self.meta is not None else None
        if bufs is not None:
            h = self.buffers.lora_scratch(len(bufs.out_slices), bufs.max_rank)
            lora_apply(x, y, bufs, self.meta, h, self.form, base_bias=layer.bias)

    def _vera(self, family: FamilyRows, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> None:
        stack = self.family_layers.vera_stack(family.key, layer.key)
        if stack is not None:
            A_l, B = self.family_layers.bases(family.key, stack.max_out, layer.in_features)
            h = self.buffers.family_scratch(A_l.shape[0])
            rows = slice(*family.span)
            vera_apply(x[rows], y[rows], A_l, B, stack, self.token_slots[family.key], h)

    def _randlora(self, family: FamilyRows, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> None:
        for (out_start, out_f), stack in self.family_layers.randlora_stacks(family.key, layer.key).items():
            A_l, V = self.family_layers.bases(family.key, out_f, layer.in_features)
            h = self.buffers.family_scratch(V.shape[1])
            rows = slice(*family.span)
            randlora_apply(x[rows], y[rows], A_l, V, stack, self.token_slots[family.key], out_start, h)
