"""Resident shared bases of VeRA / RandLoRA projection families (engine thread only).

A family's projections are generated once (bit-exactly as PEFT does, from the seed) or taken from
an adapter that brought its own, kept in the model dtype while any adapter of the family sits in a
slot, and sliced per layer shape exactly as PEFT slices them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters_store import ParsedAdapter
from adapters_store.projections import generate_projections, randlora_layer_bases, vera_layer_bases


@dataclass(slots=True)
class FamilyBases:
    kind: str
    r: int
    A: torch.Tensor
    B: torch.Tensor
    slots: set[int] = field(default_factory=set)
    _per_layer: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def layer(self, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VeRA: (A_l [r, in], B_l [out, r]). RandLoRA: (A_l [r, 1, min], V_l [max, nb·r])."""
        cached = self._per_layer.get((out_f, in_f))
        if cached is None:
            if self.kind == "vera":
                cached = vera_layer_bases(self.A, self.B, out_f, in_f)
            else:
                A_l, B_l = randlora_layer_bases(self.A, self.B, out_f, in_f, self.r)
                cached = (A_l, B_l.flatten(start_dim=1))   # V_l: PEFT flattens on every forward
            self._per_layer[(out_f, in_f)] = cached
        return cached


class FamilyCache:
    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.dtype = dtype
        self.device = device
        self._families: dict[str, FamilyBases] = {}
        self.generated = 0

    def attach(self, parsed: ParsedAdapter, slot: int) -> FamilyBases:
        key = parsed.family.key()
        bases = self._families.get(key)
        if bases is None:
            A, B = parsed.projections if parsed.projections is not None else generate_projections(parsed.family)
            bases = FamilyBases(parsed.family.kind, parsed.family.r, A.to(self.device, self.dtype),
                                B.to(self.device, self.dtype))
            self._families[key] = bases
            self.generated += 1
        bases.slots.add(slot)
        return bases

    def detach(self, slot: int) -> None:
        """The slot was reassigned: drop families no loaded adapter uses any more."""
        for key, bases in list(self._families.items()):
            bases.slots.discard(slot)
            if not bases.slots:
                del self._families[key]

    def get(self, key: str) -> FamilyBases | None:
        return self._families.get(key)

    def __len__(self) -> int:
        return len(self._families)
