"""Upload, resolve, list and delete adapters: the operations behind /adapters and adapter_id.

Uploads are parsed and validated against the frozen base before anything touches the store;
publishing is atomic, and only then does the registry point the id at the new version.

Two locks with different jobs: `_lock` guards only in-memory state (registry, which ids publish
which version, the holds in the host cache) and is never held across I/O, so `resolve` — the only
thing a request does on the event loop — never waits for a disk; `_write_lock` orders the store
mutations (publish, remove) among themselves and is never taken by `resolve`.

A version is published by every id whose current version it is (the version is a content digest,
so two ids can share one). When the last such id is deleted or re-uploaded with other content, the
version is discarded from the host cache: dropped at once, or when the last request holding it ends.
A version's files are removed only once no request waits for the loader to read them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
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
from server.adapters.loader import AdapterLoader, lower_thread_priority

log = logging.getLogger(__name__)


class AdapterService:
    def __init__(
        self,
        store: AdapterStore,
        registry: AdapterRegistry,
        cache: HostCache,
        spec: BaseModelSpec,
        observe_load_seconds: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.cache = cache
        self.spec = spec
        self.loader = AdapterLoader(self._read, cache, observe_load_seconds)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        # version -> how many ids it is the current version of (guarded by self._lock).
        self._published: Counter[str] = Counter()
        # One low-priority worker: uploads are serialised and never compete with decoding.
        self._upload_worker = ThreadPoolExecutor(
            1, thread_name_prefix="adapter-upload", initializer=lower_thread_priority
        )

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
        with self._write_lock:
            version = self.store.publish(adapter_id, files, {"info": meta})
            info = AdapterInfo.from_dict({**meta, "version": version})
            with self._lock:
                self.cache.put(version, parsed)
                previous = self.registry.register(info)
                self._published[version] += 1
                if previous is not None:
                    self._unpublish(previous.version)
            if previous is not None and previous.version != version:
                self._remove_files(adapter_id, previous.version)
        log.info("adapter %s version %s published (%s, rank %d)", adapter_id, version, info.kind, info.rank)
        return info

    def delete(self, adapter_id: str) -> AdapterInfo:
        with self._write_lock:
            with self._lock:
                info = self.registry.remove(adapter_id)
                if info is None:
                    raise AdapterNotFound(f"unknown adapter {adapter_id!r}")
                self._unpublish(info.version)
            self.cache.wait_settled(info.version)
            self.store.delete(adapter_id)
        return info

    def _remove_files(self, adapter_id: str, version: str) -> None:
        """Remove a replaced version's files once no request waits for the loader to read them
        (requests already holding its weights in memory keep them)."""
        self.cache.wait_settled(version)
        self.store.remove_version(adapter_id, version)

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

    def resolve(self, adapter_id: str) -> str:
        """The id's current version, held for the caller until the engine finishes its request
        (`HostCache.release`). In-memory only: a version not in memory is queued for the loader."""
        with self._lock:
            info = self.get(adapter_id)
            if not self.cache.hold(info.version):
                self.loader.request(info.adapter_id, info.version)
            return info.version

    def _read(self, adapter_id: str, version: str) -> ParsedAdapter:
        """Read and parse one stored version (the loader thread)."""
        files = self.store.read(adapter_id, version)
        return parse_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], self.spec)
