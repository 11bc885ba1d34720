"""Upload, resolve, list and delete adapters: the operations behind /adapters and adapter_id.

Uploads are parsed and validated against the loaded base model before anything touches the store;
publishing is atomic, and only then does the registry point the id at the new version. A lock
orders resolve-and-retain against swaps and deletes, so a request either gets a version whose
weights it holds until it finishes, or a 404.

A version is published by every id whose current version it is (the version is a content digest,
so two ids can share one). When the last such id is deleted or re-uploaded with other content, the
version is discarded from the host cache: dropped at once, or when the last request holding it ends.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

from adapters_store import (
    AdapterInfo,
    AdapterNotFound,
    AdapterRegistry,
    AdapterStore,
    BaseModelSpec,
    ParsedAdapter,
    parse_adapter,
    validate_adapter_id,
)
from adapters_store.canonical import CONFIG_FILE, WEIGHTS_FILE, canonical_files
from server.adapters.host_cache import HostCache

log = logging.getLogger(__name__)


def _lower_thread_priority() -> None:
    """Uploads yield the CPU to the engine: on a 2-core machine a busy third thread stalls torch's
    two compute threads (measured: an inter-token gap 2.7x the median while uploading)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
    except (AttributeError, OSError):
        pass


class AdapterService:
    def __init__(self, store: AdapterStore, registry: AdapterRegistry, cache: HostCache,
                 spec: BaseModelSpec) -> None:
        self.store = store
        self.registry = registry
        self.cache = cache
        self.spec = spec
        self._lock = threading.Lock()
        # version -> how many ids it is the current version of (guarded by self._lock).
        self._published: Counter[str] = Counter()
        # One low-priority worker: uploads are serialised and never compete with decoding.
        self._upload_worker = ThreadPoolExecutor(1, thread_name_prefix="adapter-upload",
                                                 initializer=_lower_thread_priority)

    def recover(self) -> int:
        """Re-register every complete adapter in the store (partial ones are cleaned by scan)."""
        for adapter_id, version in self.store.scan().items():
            info = self.store.meta(adapter_id, version)["info"]
            with self._lock:
                previous = self.registry.register(AdapterInfo.from_dict({**info, "version": version}))
                self._published[version] += 1
                if previous is not None:
                    self._unpublish(previous.version)
        return len(self.registry)

    def submit_upload(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes) -> Future[AdapterInfo]:
        """Run `upload` on the low-priority upload worker."""
        return self._upload_worker.submit(self.upload, adapter_id, config_bytes, weights_bytes)

    def upload(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes) -> AdapterInfo:
        validate_adapter_id(adapter_id)
        parsed = parse_adapter(config_bytes, weights_bytes, self.spec)
        # VeRA/RandLoRA keep only their trained vectors (projections come back from the seed).
        files = canonical_files(config_bytes, weights_bytes, parsed)
        # The version is the content digest, computed by the store while it writes (one hash pass).
        meta = AdapterInfo.from_parsed(adapter_id, "", parsed, created_at=time.time()).to_dict()
        del meta["version"]
        meta["bytes"] = sum(len(data) for data in files.values())
        with self._lock:
            version = self.store.publish(adapter_id, files, {"info": meta})
            info = AdapterInfo.from_dict({**meta, "version": version})
            self.cache.put(version, parsed)
            previous = self.registry.register(info)
            self._published[version] += 1
            if previous is not None:
                self._unpublish(previous.version)
                if previous.version != version:
                    # Requests still on the old version hold its weights in the host cache.
                    self.store.remove_version(adapter_id, previous.version)
        log.info("adapter %s version %s published (%s, rank %d)", adapter_id, version, info.kind, info.rank)
        return info

    def delete(self, adapter_id: str) -> AdapterInfo:
        with self._lock:
            info = self.registry.remove(adapter_id)
            if info is None:
                raise AdapterNotFound(f"unknown adapter {adapter_id!r}")
            self._unpublish(info.version)
            self.store.delete(adapter_id)
        return info

    def _unpublish(self, version: str) -> None:
        """One id stopped publishing `version` (called with self._lock held)."""
        self._published[version] -= 1
        if self._published[version] <= 0:
            del self._published[version]
            # Dropped now, or when the last request that resolved it finishes.
            self.cache.discard(version)

    def get(self, adapter_id: str) -> AdapterInfo:
        info = self.registry.resolve(adapter_id)
        if info is None:
            raise AdapterNotFound(f"unknown adapter {adapter_id!r}")
        return info

    def retain(self, adapter_id: str) -> str:
        """Resolve the current version and hold its weights until `cache.release(version)`."""
        with self._lock:
            info = self.get(adapter_id)
            self.cache.retain(info.version, lambda: self._load(info))
            return info.version

    def _load(self, info: AdapterInfo) -> ParsedAdapter:
        files = self.store.read(info.adapter_id, info.version)
        return parse_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], self.spec)
