"""Per-sequence KV cache slots: which slot each sequence owns (pure Python bookkeeping)."""

from __future__ import annotations

import heapq


class KVSlotAllocator:
    """Hands out the lowest free slot, so running sequences tend to occupy a contiguous prefix of the
    cache and decode attention can read it as a view instead of gathering."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)
