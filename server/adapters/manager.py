"""Engine-side adapter state: slot table, the packed weights in each slot, and per-step plans.

Runs on the engine thread only. The scheduler pins versions into slots as it admits sequences;
before each forward, `load_pending` packs the newly assigned versions into their slots.
"""

from __future__ import annotations

import torch

from kernels.batch import AdapterBatch, TokenGroup
from kernels.lora import LinearFactors
from server.adapters.host_cache import HostCache
from server.adapters.packing import pack_adapter
from server.adapters.slot_table import SlotTable
from server.model.layers import AdaptedLinear


class AdapterManager:
    def __init__(self, table: SlotTable, cache: HostCache, linears: list[AdaptedLinear],
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.table = table
        self.cache = cache
        self.linears = linears
        self.dtype = dtype
        self.device = device
        self.slot_factors: list[dict[str, LinearFactors] | None] = [None] * table.num_slots
        self.loads = 0

    def load_pending(self) -> None:
        for version, slot in self.table.take_loads():
            self.slot_factors[slot] = pack_adapter(self.cache.get(version), self.linears, self.dtype, self.device)
            self.loads += 1

    def slot_of(self, version: str | None) -> int:
        """-1 for the base model."""
        if version is None:
            return -1
        slot = self.table.slot_of(version)
        assert slot is not None, f"version {version} is running without a slot"
        return slot

    def plan(self, groups: list[TokenGroup]) -> AdapterBatch | None:
        return AdapterBatch(groups, self.slot_factors) if groups else None

    def finished(self, version: str | None) -> None:
        """A request of `version` ended (in any state); drop its host-cache hold."""
        if version is not None:
            self.cache.release(version)
