"""Slot store of the LoRA family (LoRA, rsLoRA, AdaLoRA, DoRA): A, Bᵀ and a scale per projection, plus
the optional lora bias and DoRA output scale g.

torch backend: each slot's `LinearFactors` per layer, in the model dtype on the device, read by
`lora_rows_ref` through the step's `LoraRows`.
triton backend: only the per-layer stacked `SlotBuffers` the kernels read (`kernels.slot_store`); the
factors are laid out on the host and copied in, so no per-slot device copy is kept beside them.
"""

from __future__ import annotations

import torch

from adapters_store import LayerFactors, ParsedAdapter
from kernels.batch import AdapterDelta, LoraRows, StepInputs, TokenGroup
from kernels.lora import LinearFactors, SliceFactors
from kernels.slot_store import LoraSlotStore
from server.adapters.kinds.base import SlotStore, StoreContext
from server.adapters.packing import adapted_layers, to_model


def lora_factors(parsed: ParsedAdapter, ctx: StoreContext, device: torch.device | str) -> dict[str, LinearFactors]:
    """One LoRA-family adapter per AdaptedLinear key, in the model dtype on `device`."""

    def convert(t: torch.Tensor | None) -> torch.Tensor | None:
        return to_model(t, ctx.dtype, device)

    packed = {}
    for linear, pieces in adapted_layers(parsed, ctx.linears):
        slices = []
        for s, f in pieces:
            assert isinstance(f, LayerFactors), f"{parsed.kind} adapter with {type(f).__name__} factors"
            slices.append(
                SliceFactors(
                    s.out_start,
                    s.out_features,
                    convert(f.A),
                    convert(f.B.T),
                    f.scale,
                    f.divisor,
                    convert(f.bias),
                    convert(f.output_scale),
                )
            )
        packed[linear.key] = LinearFactors(slices)
    return packed


class LoraFamilyStore(SlotStore):
    def __init__(self, ctx: StoreContext) -> None:
        super().__init__(ctx)
        self.slot_factors: list[dict[str, LinearFactors] | None] | None = None  # torch backend
        self.slots: LoraSlotStore | None = None  # triton backend
        if ctx.backend == "triton":
            from kernels.batch_triton import LoraSlots

            self._triton_part = LoraSlots
            self.slots = LoraSlotStore(ctx.linears, ctx.num_slots, ctx.dtype, ctx.device)
        else:
            self.slot_factors = [None] * ctx.num_slots

    def write(self, slot: int, parsed: ParsedAdapter) -> None:
        if self.slots is not None:
            self.slots.write(slot, lora_factors(parsed, self.ctx, "cpu"))  # copied into the device buffers
        else:
            self.slot_factors[slot] = lora_factors(parsed, self.ctx, self.ctx.device)

    def clear(self, slot: int) -> None:
        if self.slots is not None:
            self.slots.clear(slot)
        else:
            self.slot_factors[slot] = None

    def plan(self, groups: list[TokenGroup], step: StepInputs) -> list[AdapterDelta]:
        if self.slots is None:
            return [LoraRows(groups, self.slot_factors)]
        return [self._triton_part(groups, self.slots, step)]
