"""The loader: brings cold adapter versions from disk into the host cache, off every request path.

One thread at low OS priority (on a 2-core machine a busy third thread stalls torch's two compute
threads) reads and parses versions that requests hold but that are not in memory; the scheduler
admits those requests once the version is resident, and everyone else keeps decoding meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from adapters_store import AdapterError, AdapterRef, ParsedAdapter
from server.adapters.host_cache import HostCache
from server.cpu_threads import background_thread

log = logging.getLogger(__name__)


class AdapterLoader:
    def __init__(
        self,
        read: Callable[[AdapterRef, str], ParsedAdapter],
        cache: HostCache,
        observe_seconds: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        """`read(ref, version)` reads and parses one stored version."""
        self._read = read
        self._cache = cache
        self._observe = observe_seconds
        self._queue: queue.SimpleQueue[tuple[AdapterRef, str]] = queue.SimpleQueue()
        self._wanted: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="adapter-loader", daemon=True)
        self._thread.start()

    def request(self, ref: AdapterRef, version: str) -> None:
        """Bring `version` (stored under `ref`) into the host cache; no-op while queued."""
        with self._lock:
            if version in self._wanted:
                return
            self._wanted.add(version)
        self._queue.put((ref, version))

    def _run(self) -> None:
        background_thread()
        while True:
            ref, version = self._queue.get()
            started = time.perf_counter()
            try:
                if not self._cache.resident(version):
                    self._cache.fill(version, self._read(ref, version))
                    self._observe(time.perf_counter() - started)
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
