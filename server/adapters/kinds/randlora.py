"""Slot store of RandLoRA: per projection family and adapted projection, a `RandLoraProjection` with the
family's bases sliced to it (A_l, V) and every slot's trained factors in the backend's layout:

torch backend: each slot's U = λ ⊙ A_l ⊙ Γ (`randlora_u`, PEFT's op order, so the logits match PEFT's
bit for bit) in the model dtype, and its scale. U is as large as the base weight of a square layer.
triton backend: a `RandLoraStack` of every slot's λ, Γ (float32) and scale; the factored kernels never
build U (at the price of a 1e-4 rounding difference, see `kernels.shared_bases_triton`).
"""

from __future__ import annotations

from adapters_store import ParsedAdapter, RandLoraFactors
from kernels.batch import AdapterDelta, ProjectionFamilyRows, RandLoraRows, StepInputs
from kernels.shared_bases import RandLoraProjection, RandLoraSlice, RandLoraStack, randlora_u
from server.adapters.kinds.base import StoreContext
from server.adapters.kinds.projection_family import ProjectionBases, ProjectionFamilyStore
from server.adapters.packing import adapted_layers, to_model

Layers = dict[str, dict[tuple[int, int], RandLoraProjection]]  # layer key -> (out_start, out_features) -> projection


class RandLoraStore(ProjectionFamilyStore):
    def __init__(self, ctx: StoreContext) -> None:
        super().__init__(ctx)
        self._triton_part = None
        if ctx.backend == "triton":
            from kernels.batch_triton import RandLoraTokens

            self._triton_part = RandLoraTokens

    def write_layers(self, slot: int, parsed: ParsedAdapter, bases: ProjectionBases, layers: Layers) -> None:
        num, device = self.ctx.num_slots, self.ctx.device
        for linear, pieces in adapted_layers(parsed, self.ctx.linears):
            per_layer = layers.setdefault(linear.key, {})
            for s, f in pieces:
                assert isinstance(f, RandLoraFactors), f"{parsed.kind} adapter with {type(f).__name__} factors"
                where = (s.out_start, s.out_features)
                proj = per_layer.get(where)
                if proj is None:
                    A_l, V = bases.layer(s.out_features, linear.in_features)
                    proj = per_layer[where] = RandLoraProjection(*where, A_l, V)
                    if self._triton_part is not None:
                        (r, nb), min_l = f.lam.shape, f.gamma.shape[1]
                        in_le_out = linear.in_features <= s.out_features
                        proj.stack = RandLoraStack.empty(num, r, nb, min_l, in_le_out, device)
                    else:
                        proj.pieces = [None] * num
                if proj.stack is not None:
                    proj.stack.write(slot, f.lam, f.gamma, f.scale)
                else:
                    U = randlora_u(f.lam.to(proj.A_l.device), f.gamma.to(proj.A_l.device), proj.A_l)
                    proj.pieces[slot] = RandLoraSlice(to_model(U, self.ctx.dtype, device), f.scale)

    def clear_layers(self, slot: int, layers: Layers) -> None:
        for per_layer in layers.values():
            for proj in per_layer.values():
                if proj.stack is not None:
                    proj.stack.clear(slot)
                else:
                    proj.pieces[slot] = None

    def part(self, rows: ProjectionFamilyRows, layers: Layers, step: StepInputs) -> AdapterDelta:
        if self._triton_part is None:
            return RandLoraRows(rows, layers)
        return self._triton_part(rows, layers, step)
