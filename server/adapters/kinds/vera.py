"""Slot store of VeRA: per projection family and packed layer, a `VeraStack` of every slot's λ_d and λ_b
(one gather, or one Triton launch, serves all of the layer's projections) and the family's bases A_l, B
sliced to the layer. Both backends read the same layout."""

from __future__ import annotations

from adapters_store import ParsedAdapter, VeraFactors
from kernels.batch import AdapterDelta, ProjectionFamilyRows, StepInputs, VeraRows
from kernels.shared_bases import VeraLayer, VeraStack
from server.adapters.kinds.base import StoreContext
from server.adapters.kinds.projection_family import ProjectionBases, ProjectionFamilyStore
from server.adapters.packing import adapted_layers


class VeraStore(ProjectionFamilyStore):
    def __init__(self, ctx: StoreContext) -> None:
        super().__init__(ctx)
        self._triton_part = None
        if ctx.backend == "triton":
            from kernels.batch_triton import VeraTokens

            self._triton_part = VeraTokens

    def write_layers(
        self, slot: int, parsed: ParsedAdapter, bases: ProjectionBases, layers: dict[str, VeraLayer]
    ) -> None:
        for linear, pieces in adapted_layers(parsed, self.ctx.linears):
            vera = layers.get(linear.key)
            if vera is None:
                r = pieces[0][1].lambda_d.shape[0]
                stack = VeraStack(
                    [(s.out_start, s.out_features) for s in linear.slices],
                    self.ctx.num_slots,
                    r,
                    self.ctx.dtype,
                    self.ctx.device,
                )
                vera = layers[linear.key] = VeraLayer(stack, *bases.layer(stack.max_out, linear.in_features))
            for s, f in pieces:
                assert isinstance(f, VeraFactors), f"{parsed.kind} adapter with {type(f).__name__} factors"
                vera.stack.write(slot, (s.out_start, s.out_features), f.lambda_d, f.lambda_b)

    def clear_layers(self, slot: int, layers: dict[str, VeraLayer]) -> None:
        for vera in layers.values():
            vera.stack.clear(slot)

    def part(self, rows: ProjectionFamilyRows, layers: dict[str, VeraLayer], step: StepInputs) -> AdapterDelta:
        if self._triton_part is None:
            return VeraRows(rows, layers)
        return self._triton_part(rows, layers, step)
