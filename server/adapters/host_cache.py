"""The host tier: parsed adapters in memory, and the one reference count of every adapter version.

A request *holds* its adapter version from the moment it is resolved (HTTP side, `hold`) until it
finishes (engine side, `release`): that count, kept here and nowhere else, is what keeps a version's
weights in memory however the id is re-uploaded or deleted meanwhile. A held version that is not in
memory yet is brought in by the loader thread (`fill`); the scheduler admits its requests once it is
`resident`, or fails them if the load failed (`load_error`). Unheld entries are evicted
least-recently-used once the cache exceeds its byte budget and are re-read from the store on the
next use.

A version that stops being published (its id deleted, or re-uploaded with other content) is
`discard`ed: dropped at once when no request holds it, else at its last `release`. Dropped
adapters are many small tensors that glibc keeps in its heap after `free`, so once enough bytes
have been dropped the cache asks glibc to give the free pages back to the OS (`malloc_trim`).
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store import ParsedAdapter

# Dropped bytes after which free heap pages are handed back to the OS. One LoRA r16 on q,k,v,o of
# SmolLM2 is 7.4 MB, so deleting a few adapters triggers a trim; a trim then costs a few ms.
TRIM_AFTER_BYTES = 16 * 2**20


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library is not glibc (musl, macOS, Windows)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> bool:
    """Return free pages of every malloc arena to the OS; False where that is not available."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


@dataclass(slots=True)
class TierCounts:
    """Monotonic counters of one memory tier, read by /metrics at scrape time."""

    hits: int = 0  # a version was wanted and already there
    loads: int = 0  # a version was brought in from the tier below
    evictions: int = 0  # a version was pushed out to make room (not deletions)


class HostCache:
    def __init__(self, max_bytes: int, trim_after_bytes: int = TRIM_AFTER_BYTES) -> None:
        self.max_bytes = max_bytes
        self.trim_after_bytes = trim_after_bytes
        self.counts = TierCounts()
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when a held version arrives or fails
        self._errors: dict[str, str] = {}  # held versions whose load failed, with why
        self._entries: OrderedDict[str, ParsedAdapter] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._refs: Counter[str] = Counter()
        self._discarded: set[str] = set()  # retained entries to drop at their last release
        self._bytes = 0  # sum of self._sizes, kept as entries come and go
        self._dropped_since_trim = 0
        self.trims = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, version: str) -> bool:
        with self._lock:
            return version in self._entries

    def put(self, version: str, parsed: ParsedAdapter) -> None:
        """Cache `version` (just published: a pending discard of it is cancelled)."""
        with self._lock:
            self._insert(version, parsed)
            self._discarded.discard(version)
            self._errors.pop(version, None)
            self._evict()
            self._settled.notify_all()
        self._maybe_trim()

    def hold(self, version: str) -> bool:
        """Count one more request on `version` until its `release`; True when it is in memory now
        (False: the caller asks the loader for it)."""
        with self._lock:
            self._refs[version] += 1
            resident = version in self._entries
            if resident:
                self._entries.move_to_end(version)
                self.counts.hits += 1
            return resident

    def fill(self, version: str, parsed: ParsedAdapter) -> None:
        """The loader brought `version` in from disk; kept only while someone still holds it."""
        with self._lock:
            if self._refs[version] > 0 and version not in self._entries:
                self._insert(version, parsed)
                self.counts.loads += 1
                self._evict()
            self._settled.notify_all()
        self._maybe_trim()

    def fail(self, version: str, message: str) -> None:
        """The loader could not bring `version` in: its waiting requests fail with `message`."""
        with self._lock:
            if self._refs[version] > 0:
                self._errors[version] = message
            self._settled.notify_all()

    def resident(self, version: str) -> bool:
        with self._lock:
            return version in self._entries

    def load_error(self, version: str) -> str | None:
        with self._lock:
            return self._errors.get(version)

    def wait_settled(self, version: str, timeout: float = 30.0) -> None:
        """Block until no request holds `version` waiting for a load (it arrived, failed or was
        released). Called before a version's files are removed, off the event loop."""
        with self._lock:
            self._settled.wait_for(
                lambda: self._refs[version] == 0 or version in self._entries or version in self._errors, timeout
            )

    def get(self, version: str) -> ParsedAdapter:
        with self._lock:
            return self._entries[version]

    def release(self, version: str) -> None:
        with self._lock:
            refs = self._refs.pop(version, 0) - 1
            if refs > 0:
                self._refs[version] = refs
            else:
                self._errors.pop(version, None)
                self._settled.notify_all()
                if version in self._discarded:
                    self._discarded.remove(version)
                    if version in self._entries:
                        self._drop(version)
            self._evict()
        self._maybe_trim()

    def discard(self, version: str) -> None:
        """`version` is no longer published: drop it now if unheld, else at its last release.

        The caller orders this after every `hold` that could resolve to `version` (the adapter
        service holds its lock around both); a later `put` of the same version cancels it.
        """
        with self._lock:
            if self._refs[version] > 0:
                self._discarded.add(version)
            elif version in self._entries:
                self._drop(version)
        self._maybe_trim()

    def is_discarded(self, version: str) -> bool:
        with self._lock:
            return version in self._discarded

    # ---- internals (called with self._lock held, except _maybe_trim) -------------------------
    def _insert(self, version: str, parsed: ParsedAdapter) -> None:
        if version in self._entries:
            self._bytes -= self._sizes[version]
        size = parsed.nbytes
        self._entries[version] = parsed
        self._entries.move_to_end(version)
        self._sizes[version] = size
        self._bytes += size

    def _drop(self, version: str) -> None:
        del self._entries[version]
        size = self._sizes.pop(version)
        self._bytes -= size
        self._dropped_since_trim += size

    def _evict(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        victims = []
        over = self._bytes - self.max_bytes
        for version in self._entries:  # least recently used first
            if over <= 0:
                break
            if self._refs[version] == 0:
                victims.append(version)
                over -= self._sizes[version]
        for version in victims:
            self._drop(version)
            self.counts.evictions += 1

    def _maybe_trim(self) -> None:
        """After enough dropped bytes, hand free heap pages back to the OS (outside the lock)."""
        with self._lock:
            if self._dropped_since_trim < self.trim_after_bytes:
                return
            self._dropped_since_trim = 0
        if release_free_memory():
            self.trims += 1
