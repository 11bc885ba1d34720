"""Which adapter version sits in which slot (pure Python, no tensors).

A version is pinned while any running sequence uses it; unpinned resident versions stay in their
slot (so the next request for them needs no load) and are evicted least-recently-used first when a
new version needs a slot. When every slot is pinned, `acquire` says no and the request waits.
"""

from __future__ import annotations

from collections import Counter, OrderedDict


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[str, int] = {}
        self._pins: Counter[str] = Counter()
        self._evictable: OrderedDict[str, None] = OrderedDict()   # unpinned residents, oldest first
        self._to_load: list[tuple[str, int]] = []

    def slot_of(self, version: str) -> int | None:
        return self._slot_of.get(version)

    def can_acquire(self, version: str) -> bool:
        return version in self._slot_of or bool(self._free) or bool(self._evictable)

    def acquire(self, version: str) -> int | None:
        """Pin `version` into a slot; None when all slots are pinned by other versions."""
        slot = self._slot_of.get(version)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self._evictable:
                victim, _ = self._evictable.popitem(last=False)
                slot = self._slot_of.pop(victim)
            else:
                return None
            self._slot_of[version] = slot
            self._to_load.append((version, slot))
        self._evictable.pop(version, None)
        self._pins[version] += 1
        return slot

    def release(self, version: str) -> None:
        self._pins[version] -= 1
        if self._pins[version] <= 0:
            del self._pins[version]
            self._evictable[version] = None

    def take_loads(self) -> list[tuple[str, int]]:
        """Slots assigned since the last call, whose weights must be copied in before the forward."""
        loads, self._to_load = self._to_load, []
        return loads

    @property
    def num_pinned(self) -> int:
        return len(self._pins)

    @property
    def resident(self) -> dict[str, int]:
        return dict(self._slot_of)
