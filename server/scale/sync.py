"""Keeps a replica's adapter registry in step with a store that other replicas write too."""

from __future__ import annotations

import logging
import threading
import time

from server.adapters.service import AdapterService
from server.cpu_threads import background_thread

log = logging.getLogger(__name__)

REFRESH_S = 0.5
"""How often the registry is refreshed from a shared store: a change made through any replica is
served by every replica within this plus one listing of the changed pointers (well under 2 s)."""


class RegistrySync:
    """A daemon thread that runs `AdapterService.refresh` every `interval_s`. The request path never
    waits for it: `resolve` stays an in-memory lookup of what the last refresh registered."""

    def __init__(self, service: AdapterService, interval_s: float = REFRESH_S) -> None:
        self.service = service
        self.interval_s = interval_s
        self.refreshed_at = 0.0  # time.monotonic() of the last refresh that succeeded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-sync", daemon=True)

    def start(self) -> RegistrySync:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        background_thread()
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                changed = self.service.refresh()
            except Exception as exc:  # the store is unreachable for a moment: keep serving what we know
                if not failing:
                    log.warning("refreshing adapters from the shared store failed (will retry): %s", exc)
                failing = True
                continue
            if failing:
                log.info("refreshing adapters from the shared store works again")
            failing = False
            self.refreshed_at = time.monotonic()
            if changed:
                log.debug("registry refresh: %d adapters changed", changed)
