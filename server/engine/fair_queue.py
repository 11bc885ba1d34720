"""Waiting sequences, one FIFO per tenant, offered to admission round-robin across tenants.

Iterating gives the order admission should try them in: round 0 holds each tenant's first waiting
sequence, round 1 each tenant's second, and so on; within a round, tenants with fewer running
sequences go first, then the tenant served longest ago. So a tenant that floods the queue with 64
requests gets every other admission while another tenant waits, not the next 64. With one tenant
this is plain arrival order.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Waiting(Protocol):
    @property
    def tenant(self) -> str: ...


T = TypeVar("T", bound=Waiting)


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}  # tenant -> its waiting sequences, oldest first
        self._served: dict[str, int] = {}  # tenant -> admission tick when it was last served
        self._tick = 0

    def append(self, item: T) -> None:
        self._queues.setdefault(item.tenant, deque()).append(item)

    def appendleft(self, item: T) -> None:
        """Back to the head of its tenant's queue (a preempted sequence resumes first)."""
        self._queues.setdefault(item.tenant, deque()).appendleft(item)

    def remove(self, item: T) -> None:
        queue = self._queues[item.tenant]
        queue.remove(item)
        if not queue:
            del self._queues[item.tenant]

    def served(self, tenant: str) -> None:
        """`tenant` just had a sequence admitted: it goes behind the others of its round."""
        self._tick += 1
        self._served[tenant] = self._tick

    def tenants(self) -> set[str]:
        return set(self._queues)

    def in_turn(self, running: Counter[str] | None = None) -> list[T]:
        """Every waiting item, in the order admission should try them (see the module docstring)."""
        running = running or Counter()
        tenants = sorted(self._queues, key=lambda t: (running[t], self._served.get(t, 0)))
        depth = max((len(q) for q in self._queues.values()), default=0)
        return [self._queues[t][i] for i in range(depth) for t in tenants if i < len(self._queues[t])]

    def __iter__(self) -> Iterator[T]:
        return iter(self.in_turn())

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._queues)
