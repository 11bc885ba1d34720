"""The Triton-backend AdapterBatch: LoRA-family tokens and VeRA families through the Triton ops.

Imports triton (via kernels.triton_ops), so only the "triton" backend imports this module. Same plan as
`AdapterBatch` (same groups and families, built by AdapterManager.plan), plus one `StepMeta` per step
shared by every layer and the per-layer slot buffers. LoRA/DoRA/rsLoRA/AdaLoRA run as one segment-form
shrink+expand per layer (all adapters of the step in one launch pair); VeRA runs the fused gather-scale
ops per family and projection; RandLoRA keeps the torch reference (no kernel for it yet).
"""

from __future__ import annotations

import torch

from kernels.batch import AdapterBatch, FamilyLayers, FamilyRows, LinearLike, TokenGroup
from kernels.lora import LinearFactors
from kernels.segments import StepMeta, build_step_meta
from kernels.slot_store import LoraSlotStore
from kernels.triton_ops import alloc_shrink_buffer, lora_apply, vera_apply


class TritonAdapterBatch(AdapterBatch):
    def __init__(self, groups: list[TokenGroup], families: list[FamilyRows],
                 slot_factors: list[dict[str, LinearFactors] | None], family_layers: FamilyLayers,
                 slots: LoraSlotStore) -> None:
        super().__init__(groups, families, slot_factors, family_layers)
        self.slots = slots
        self.meta: StepMeta | None = None
        if groups:   # once per step: every layer reads the same metadata
            num_tokens = max(g.end for g in groups)
            self.meta = build_step_meta([(g.slot, g.start, g.end) for g in groups], num_tokens,
                                        device=slots.device)
        self._family_slots: dict[tuple[str, int], torch.Tensor] = {}

    def _lora(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> None:
        bufs = self.slots.get(layer.key) if self.meta is not None else None
        if bufs is not None:
            h = alloc_shrink_buffer(bufs, self.meta.max_tokens)
            lora_apply(x, y, bufs, self.meta, h, "segments", base_bias=layer.bias)

    def _vera(self, family: FamilyRows, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> None:
        token_slots = self._token_slots(family, x.shape[0], x.device)
        vectors = self.family_layers.vera_vectors(family.key, layer.key)
        for (out_start, out_f), (lambda_d, lambda_b) in vectors.items():
            A_l, B_l = self.family_layers.bases(family.key, out_f, layer.in_features)
            vera_apply(x, y, A_l, B_l, lambda_d, lambda_b, token_slots, out_start)

    def _token_slots(self, family: FamilyRows, num_rows: int, device: torch.device) -> torch.Tensor:
        """[num_rows] int32: the family's rows carry their slot, every other row −1 (built once per step)."""
        cached = self._family_slots.get((family.key, num_rows))
        if cached is None:
            cached = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
            rows = family.rows if isinstance(family.rows, slice) else family.rows.to(device)
            cached[rows] = family.token_slots.to(device=device, dtype=torch.int32)
            self._family_slots[(family.key, num_rows)] = cached
        return cached
