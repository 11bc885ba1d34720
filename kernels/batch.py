"""One step's adapter plan: which token rows use which adapter, and how each layer applies them.

The runner orders the packed batch so every adapter's tokens are contiguous (decodes grouped by
family, then slot; prefill segments are contiguous already). LoRA-family adapters are applied per
row range. VeRA and RandLoRA adapters are applied per projection family, so the products with the
family's shared bases are done once for all of its tokens. Base-model tokens (slot −1) are in no
group and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels.lora import LinearFactors, lora_rows_ref
from kernels.shared_bases import RandLoraStack, VeraStack, randlora_family_ref, vera_family_ref


@dataclass(frozen=True, slots=True)
class TokenGroup:
    """Rows [start, end) of the packed batch all use the adapter in `slot`.

    Example: decodes of slots [3, 3, -1, 5] and a 4-token prefill for slot 3 give
    groups (3, 0, 2), (5, 3, 4), (3, 4, 8); row 2 is a base-model token and is in no group.
    """

    slot: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class FamilyRows:
    """The tokens of one VeRA/RandLoRA projection family in this step.

    Example: groups (3, 0, 2), (5, 4, 6) of one family give rows = tensor([0, 1, 4, 5]),
    token_slots = tensor([3, 3, 5, 5]), members = [(slice(0, 2), 3), (slice(2, 4), 5)], span = (0, 6).
    """

    kind: str                                # "vera" | "randlora"
    key: str                                 # family key
    rows: slice | torch.Tensor               # the family's rows in the packed batch
    token_slots: torch.Tensor                # [n] adapter slot of each of those rows
    members: list[tuple[slice, int]]         # (rows within the family's tokens, slot)
    span: tuple[int, int] = (0, 0)           # [first row, last row + 1] of the family (host ints)


class FamilyLayers(Protocol):
    def vera_stack(self, family: str, layer_key: str) -> VeraStack | None: ...
    def randlora_stacks(self, family: str, layer_key: str) -> dict[tuple[int, int], RandLoraStack | None]: ...
    def bases(self, family: str, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class LinearLike(Protocol):
    key: str
    in_features: int
    bias: torch.Tensor | None


class AdapterBatch:
    """Implements the model's AdapterDelta: adds every adapter's contribution to a layer's output."""

    def __init__(self, groups: list[TokenGroup], families: list[FamilyRows],
                 slot_factors: list[dict[str, LinearFactors] | None], family_layers: FamilyLayers) -> None:
        self.groups = groups                 # LoRA-family adapters only
        self.families = families
        self.slot_factors = slot_factors     # slot -> {layer key -> factors}
        self.family_layers = family_layers

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._lora(layer, x, y)
        for family in self.families:
            if family.kind == "vera":
                self._vera(family, layer, x, y)
            else:
                self._randlora(family, layer, x, y)
        return y

    def _lora(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> None:
        """LoRA-family adapters, one row range at a time (the backend-specific part).

        Always at the process's thread count, as PEFT runs: on AVX-512 machines MKL picks another
        kernel for one thread than for two, and running small groups single-threaded (faster on an
        AVX2 machine) moved DoRA's logits 1.06e-4 away from PEFT's; at the same thread count they
        are bit-identical."""
        for group in self.groups:
            factors = self.slot_factors[group.slot].get(layer.key)
            if factors is not None:
                lora_rows_ref(x[group.start:group.end], y[group.start:group.end], layer.bias, factors)

    def _vera(self, family: FamilyRows, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> None:
        stack = self.family_layers.vera_stack(family.key, layer.key)
        if stack is not None:
            A_l, B = self.family_layers.bases(family.key, stack.max_out, layer.in_features)
            vera_family_ref(x, y, family.rows, family.token_slots, A_l, B, stack)

    def _randlora(self, family: FamilyRows, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> None:
        for out_start, out_f in self.family_layers.randlora_stacks(family.key, layer.key):
            _, V = self.family_layers.bases(family.key, out_f, layer.in_features)
            members = []
            for rows, slot in family.members:
                factors = self.slot_factors[slot].get(layer.key)
                piece = next((s for s in factors.slices if s.out_start == out_start), None) if factors else None
                members.append((rows, piece))
            randlora_family_ref(x, y[:, out_start:out_start + out_f], family.rows, members, V)
