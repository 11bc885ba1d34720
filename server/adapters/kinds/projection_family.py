"""What the kinds built on shared random projections (VeRA, RandLoRA) have in common.

Adapters whose projections are identical (same kind, seed, r, max layer shape, sparsity, basis dtype,
or the same stored projections) form one *projection family*, named by `ProjectionFamily.key()`. The
family's projections are generated once (bit-exactly as PEFT does, from the seed) or taken from an
adapter that brought its own, kept in the model dtype on the device while any slot holds an adapter of
the family, and sliced per layer shape exactly as PEFT slices them (`ProjectionBases.layer`).

`ProjectionFamilyStore` is the slot store skeleton of such a kind: per resident projection family, the
bases and one structure per adapted layer (what the kind's kernels read: every slot's factors plus the
bases sliced to the layer), written at load; decodes ordered by projection family; and per step one
plan part per projection family in the step, built from its rows (`ProjectionFamilyRows`).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters_store import ParsedAdapter
from adapters_store.projections import generate_projections, randlora_layer_bases, vera_layer_bases
from kernels.batch import AdapterDelta, ProjectionFamilyRows, StepInputs, TokenGroup
from server.adapters.kinds.base import SlotStore, StoreContext


@dataclass(slots=True)
class ProjectionBases:
    """One resident projection family's shared projections (model dtype, on the device)."""

    kind: str
    r: int
    A: torch.Tensor
    B: torch.Tensor
    slots: set[int] = field(default_factory=set)  # slots holding an adapter of the family
    _per_layer: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def layer(self, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VeRA: (A_l [r, in], B_l [out, r]). RandLoRA: (A_l [r, 1, min], V_l [max, nb·r])."""
        cached = self._per_layer.get((out_f, in_f))
        if cached is None:
            if self.kind == "vera":
                cached = vera_layer_bases(self.A, self.B, out_f, in_f)
            else:
                A_l, B_l = randlora_layer_bases(self.A, self.B, out_f, in_f, self.r)
                cached = (A_l, B_l.flatten(start_dim=1))  # V_l: PEFT flattens on every forward
            self._per_layer[(out_f, in_f)] = cached
        return cached


class ProjectionFamilyStore(SlotStore):
    """Slot store of a kind served per projection family. Subclasses say what a layer holds."""

    def __init__(self, ctx: StoreContext) -> None:
        super().__init__(ctx)
        self.bases: dict[str, ProjectionBases] = {}  # projection family key -> its bases
        self.layers: dict[str, dict[str, Any]] = {}  # projection family key -> layer key -> layer part
        self.family_of: list[str | None] = [None] * ctx.num_slots
        self.generated = 0  # projections generated (or taken) so far

    # ---- what a kind defines --------------------------------------------------------------------
    @abstractmethod
    def write_layers(self, slot: int, parsed: ParsedAdapter, bases: ProjectionBases, layers: dict[str, Any]) -> None:
        """Write `parsed`'s trained factors into `slot` of its projection family's layer structures
        (`layers`, created here on first use)."""

    @abstractmethod
    def clear_layers(self, slot: int, layers: dict[str, Any]) -> None:
        """Remove `slot`'s factors from its projection family's layer structures."""

    @abstractmethod
    def part(self, rows: ProjectionFamilyRows, layers: dict[str, Any], step: StepInputs) -> AdapterDelta:
        """The step plan part of one projection family's tokens."""

    # ---- SlotStore ------------------------------------------------------------------------------
    def write(self, slot: int, parsed: ParsedAdapter) -> None:
        key = parsed.family.key()
        bases = self.bases.get(key)
        if bases is None:
            A, B = parsed.projections if parsed.projections is not None else generate_projections(parsed.family)
            dtype, device = self.ctx.dtype, self.ctx.device
            bases = self.bases[key] = ProjectionBases(
                parsed.family.kind, parsed.family.r, A.to(device, dtype), B.to(device, dtype)
            )
            self.generated += 1
        bases.slots.add(slot)
        self.family_of[slot] = key
        self.write_layers(slot, parsed, bases, self.layers.setdefault(key, {}))

    def clear(self, slot: int) -> None:
        key, self.family_of[slot] = self.family_of[slot], None
        if key is None:
            return
        self.clear_layers(slot, self.layers[key])
        bases = self.bases[key]
        bases.slots.discard(slot)
        if not bases.slots:  # no loaded adapter uses the projection family any more
            del self.bases[key], self.layers[key]

    def order_key(self, slot: int) -> str:
        return self.family_of[slot]

    def plan(self, groups: list[TokenGroup], step: StepInputs) -> list[AdapterDelta]:
        by_family: dict[str, list[TokenGroup]] = {}
        for g in groups:
            by_family.setdefault(self.family_of[g.slot], []).append(g)
        return [
            self.part(ProjectionFamilyRows.of(members, step.device), self.layers[key], step)
            for key, members in by_family.items()
        ]
