"""What every adapter kind's slot store provides to the AdapterManager.

A slot store owns one kind's weights for every slot that holds an adapter of that kind, in the
layout that kind's kernels read on the active backend, and nothing else: no second copy for the
other backend, no per-slot copy that a stacked layout already holds. The manager only routes:
a slot's new adapter goes to its kind's store (`write`), the slot's previous adapter is removed
from its own store first (`clear`), and each step every store that has tokens in it builds its
part of the step plan (`plan`), an AdapterDelta holding every tensor its kernels read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from adapters_store import ParsedAdapter
from kernels.batch import AdapterDelta, StepInputs, TokenGroup
from server.model.layers import AdaptedLinear


@dataclass(frozen=True, slots=True)
class StoreContext:
    """Fixed for the process: the model's adapted layers, the slot count, where weights live, the backend."""

    linears: list[AdaptedLinear]
    num_slots: int
    dtype: torch.dtype
    device: torch.device | str
    backend: str  # "torch" | "triton" (kernels.backend.BACKENDS)


class SlotStore(ABC):
    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def write(self, slot: int, parsed: ParsedAdapter) -> None:
        """Load `parsed` into `slot` (which holds nothing of this store: the manager cleared it)."""

    @abstractmethod
    def clear(self, slot: int) -> None:
        """Forget the adapter this store holds in `slot`; a later step must not see it."""

    @abstractmethod
    def plan(self, groups: list[TokenGroup], step: StepInputs) -> list[AdapterDelta]:
        """This store's part of a step: `groups` are the step's token groups whose slots it holds, in row
        order. Built once per step; each delta's `apply` runs in every AdaptedLinear."""

    def order_key(self, slot: int) -> str:
        """Decodes are sorted by (this key, slot): slots with equal keys get contiguous rows (a projection
        family's tokens, so its shared-bases products are one per step). "" for kinds applied per slot."""
        return ""
