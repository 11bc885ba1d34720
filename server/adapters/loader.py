"""The loader: brings cold adapter versions from disk into the host cache, off every request path.

Versions that requests hold but that are not in memory are read (up to PREFETCH ahead, on reader
threads) and parsed by one loader thread, in its turn between engine steps (server/cpu_threads.py);
the scheduler admits those requests once the version is resident, and everyone else keeps decoding
meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from adapters_store import AdapterError, AdapterRef, ParsedAdapter
from server.adapters.host_cache import HostCache
from server.cpu_threads import background_thread

Files = dict[str, bytes]

log = logging.getLogger(__name__)


PREFETCH = 4
"""Versions read from disk ahead of the one being parsed: a burst of cold requests then needs one short
parsing turn per version between engine steps instead of a disk read per step boundary (bounded, so a
burst of loads holds at most this many files' bytes)."""


class AdapterLoader:
    def __init__(
        self,
        fetch: Callable[[AdapterRef, str], Files],
        parse: Callable[[Files], ParsedAdapter],
        cache: HostCache,
        observe_seconds: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        """`fetch(ref, version)` reads one stored version's files (disk I/O, on reader threads);
        `parse(files)` turns them into a ParsedAdapter (CPU, on the loader thread)."""
        self._fetch = fetch
        self._parse = parse
        self._cache = cache
        self._observe = observe_seconds
        self._queue: queue.SimpleQueue[tuple[AdapterRef, str, float]] = queue.SimpleQueue()
        self._wanted: set[str] = set()
        self._lock = threading.Lock()
        self._readers = ThreadPoolExecutor(PREFETCH, thread_name_prefix="adapter-read", initializer=background_thread)
        self._thread = threading.Thread(target=self._run, name="adapter-loader", daemon=True)
        self._thread.start()

    def request(self, ref: AdapterRef, version: str) -> None:
        """Bring `version` (stored under `ref`) into the host cache; no-op while queued."""
        with self._lock:
            if version in self._wanted:
                return
            self._wanted.add(version)
        self._queue.put((ref, version, time.perf_counter()))

    def _run(self) -> None:
        background_thread()
        reading: deque[tuple[AdapterRef, str, float, Future[Files]]] = deque()
        while True:
            while len(reading) < PREFETCH:  # keep the readers busy ahead of the parser
                try:
                    item = self._queue.get(block=not reading)
                except queue.Empty:
                    break
                ref, version, requested = item
                reading.append((ref, version, requested, self._readers.submit(self._fetch, ref, version)))
            ref, version, requested, files = reading.popleft()
            try:
                if not self._cache.resident(version):
                    self._cache.fill(version, self._parse(files.result()))
                    self._observe(time.perf_counter() - requested)
            except (AdapterError, OSError, ValueError) as exc:
                log.warning("loading adapter %s version %s failed: %s", ref, version, exc)
                self._cache.fail(version, f"adapter {str(ref)!r} version {version} could not be loaded: {exc}")
            except Exception as exc:  # never let one bad file stop every later load
                log.exception("loading adapter %s version %s failed", ref, version)
                self._cache.fail(
                    version, f"adapter {str(ref)!r} version {version} could not be loaded: {type(exc).__name__}"
                )
            finally:
                with self._lock:
                    self._wanted.discard(version)
