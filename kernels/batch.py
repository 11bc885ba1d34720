"""One step's adapter plan: which contiguous token rows use which adapter slot.

The runner orders the packed batch so every adapter's tokens are contiguous (decodes grouped by
slot, prefill segments are contiguous already), so applying an adapter needs no gather or scatter:
each group is a plain row range. Base-model tokens (slot −1) simply have no group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels.lora import LinearFactors, lora_rows_ref


@dataclass(frozen=True, slots=True)
class TokenGroup:
    """Rows [start, end) of the packed batch all use the adapter in `slot`.

    Example: decodes of slots [3, 3, -1, 5] and a 4-token prefill for slot 3 give
    groups (3, 0, 2), (5, 3, 4), (3, 4, 8); row 2 is a base-model token and is in no group.
    """

    slot: int
    start: int
    end: int


class LinearLike(Protocol):
    key: str
    bias: torch.Tensor | None


class AdapterBatch:
    """Implements the model's AdapterDelta: adds each group's adapter delta to a layer's output."""

    def __init__(self, groups: list[TokenGroup], slot_factors: list[dict[str, LinearFactors] | None]) -> None:
        self.groups = groups
        self.slot_factors = slot_factors   # slot -> {linear key -> factors}; None = empty slot

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for group in self.groups:
            factors = self.slot_factors[group.slot].get(layer.key)
            if factors is None:            # this adapter does not target this layer
                continue
            rows = slice(group.start, group.end)
            lora_rows_ref(x[rows], y[rows], layer.bias, factors)
        return y
