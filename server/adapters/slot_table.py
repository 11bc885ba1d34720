"""The device tier: which adapter version sits in which slot (pure Python, no tensors).

A version stays in its slot after its requests finish (so the next request for it needs no load)
and is evicted least-recently-used when a new version needs a slot. Which versions are in use is not
counted here: the scheduler passes the versions of its running sequences to `acquire`, so there is
one reference count per version in the whole server (the host cache's holds). When every slot is
used by running sequences, `acquire` says no and the request waits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

from server.adapters.host_cache import TierCounts


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.counts = TierCounts()
        self._free = list(range(num_slots - 1, -1, -1))
        self._lru: OrderedDict[str, int] = OrderedDict()  # resident version -> slot, least recent first
        self._to_load: list[tuple[str, int]] = []

    def slot_of(self, version: str) -> int | None:
        return self._lru.get(version)

    def acquire(self, version: str, in_use: Collection[str] = ()) -> int | None:
        """A slot holding `version`, loading it into a free slot or the least recently used one that
        no version in `in_use` occupies; None when every slot is in use."""
        slot = self._lru.get(version)
        if slot is not None:
            self.counts.hits += 1
        else:
            if self._free:
                slot = self._free.pop()
            else:
                victim = next((v for v in self._lru if v not in in_use), None)
                if victim is None:
                    return None
                slot = self._lru.pop(victim)
                self.counts.evictions += 1
            self._to_load.append((version, slot))
            self.counts.loads += 1
        self._lru[version] = slot
        self._lru.move_to_end(version)
        return slot

    def take_loads(self) -> list[tuple[str, int]]:
        """Slots assigned since the last call, whose weights must be copied in before the forward."""
        loads, self._to_load = self._to_load, []
        return loads

    @property
    def resident(self) -> dict[str, int]:
        return dict(self._lru)
