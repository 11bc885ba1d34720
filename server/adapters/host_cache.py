"""Parsed adapters kept in host memory, shared by the HTTP threads and the engine thread.

A request retains its adapter version from the moment it is resolved until it finishes, so the
weights it started with stay available even if the adapter is re-uploaded or deleted meanwhile.
Unretained entries are evicted least-recently-used once the cache exceeds its byte budget; they
are re-read from the store on the next use.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import Callable

from adapters_store import ParsedAdapter


class HostCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, ParsedAdapter] = OrderedDict()
        self._refs: Counter[str] = Counter()

    def put(self, version: str, parsed: ParsedAdapter) -> None:
        with self._lock:
            self._entries[version] = parsed
            self._entries.move_to_end(version)
            self._evict()

    def retain(self, version: str, load: Callable[[], ParsedAdapter]) -> ParsedAdapter:
        """Pin `version` in memory (loading it with `load` on a miss) until `release`."""
        with self._lock:
            parsed = self._entries.get(version)
            if parsed is not None:
                self._refs[version] += 1
                self._entries.move_to_end(version)
                return parsed
        parsed = load()  # outside the lock: disk read + parse
        with self._lock:
            parsed = self._entries.setdefault(version, parsed)
            self._refs[version] += 1
            self._evict()
            return parsed

    def get(self, version: str) -> ParsedAdapter:
        with self._lock:
            return self._entries[version]

    def release(self, version: str) -> None:
        with self._lock:
            self._refs[version] -= 1
            if self._refs[version] <= 0:
                del self._refs[version]
            self._evict()

    def _evict(self) -> None:
        total = sum(p.nbytes for p in self._entries.values())
        for version in list(self._entries):
            if total <= self.max_bytes:
                return
            if self._refs[version] == 0:
                total -= self._entries.pop(version).nbytes
                del self._refs[version]

    def __contains__(self, version: str) -> bool:
        with self._lock:
            return version in self._entries
