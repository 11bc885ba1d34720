"""Upload, resolve, list and delete adapters on behalf of a caller: the operations behind /adapters
and every route that names an adapter.

Tenants: an adapter belongs to the tenant that uploaded it, and ids are per tenant. A caller names
its own adapter `id`, and another tenant's `owner/id`, which it may use only when that adapter is
public (or the caller is an admin). Whatever the caller may not see answers 404 exactly like an id
that does not exist, so ids never leak across tenants.

Uploads are parsed and validated against the frozen base before anything touches the store;
publishing is atomic, and only then does the registry point the id at the new version.

Two locks with different jobs: `_lock` guards only in-memory state (registry, which ids publish
which version, the holds in the host cache) and is never held across I/O, so `resolve` — the only
thing a request does on the event loop — never waits for a disk; `_write_lock` orders the store
mutations (publish, remove, access changes) among themselves and is never taken by `resolve`.

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
from dataclasses import replace

from adapters_store import (
    DEFAULT_TENANT,
    AdapterError,
    AdapterInfo,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    BaseModelSpec,
    InvalidAdapterId,
    ParsedAdapter,
    TenantStores,
    parse_adapter,
    validate_adapter_id,
    validate_tenant,
)
from adapters_store.canonical import CONFIG_FILE, WEIGHTS_FILE, canonical_files
from server.adapters.host_cache import HostCache
from server.adapters.loader import AdapterLoader
from server.cpu_threads import CpuTurns, background_thread
from server.errors import Forbidden, LimitExceeded
from server.tenancy.limits import STORAGE_RETRY_AFTER_S, TenantLimits
from server.tenancy.principal import OPERATOR, Principal

log = logging.getLogger(__name__)


class AdapterService:
    def __init__(
        self,
        stores: TenantStores,
        registry: AdapterRegistry,
        cache: HostCache,
        spec: BaseModelSpec,
        observe_load_seconds: Callable[[float], None] = lambda seconds: None,
        limits: Callable[[str], TenantLimits] = lambda tenant: TenantLimits(),
        turns: CpuTurns | None = None,
    ) -> None:
        self.stores = stores
        # Parsing and validating take their turn between engine steps (server/cpu_threads.py).
        self.turns = turns or CpuTurns()
        self.registry = registry
        self.limits = limits
        self.cache = cache
        self.spec = spec
        # A stored version's bytes match the digest taken at upload, when they were validated: loading it
        # re-checks shapes, not values (the value checks were ~40% of a cold load's CPU time).
        self._stored_spec = replace(spec, check_values=False)
        self.loader = AdapterLoader(self._fetch, self._parse_stored, cache, observe_load_seconds)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        # version -> how many ids it is the current version of (guarded by self._lock).
        self._published: Counter[str] = Counter()
        # One low-priority worker: uploads are serialised and never compete with decoding.
        self._upload_worker = ThreadPoolExecutor(1, thread_name_prefix="adapter-upload", initializer=background_thread)

    def recover(self) -> int:
        """Re-register every complete adapter of every tenant (partial ones are cleaned by scan)."""
        for ref, version in self.stores.scan().items():
            store = self.stores.store(ref.tenant)
            info = store.meta(ref.adapter_id, version)["info"]
            public = bool(store.access(ref.adapter_id).get("public", False))
            info = AdapterInfo.from_dict({**info, "version": version, "tenant": ref.tenant, "public": public})
            with self._lock:
                previous = self.registry.register(info)
                self._published[version] += 1
                if previous is not None:
                    self._unpublish(previous.version)
        return len(self.registry)

    def refresh(self) -> int:
        """Bring the registry in step with a store that other processes write too (S3: every
        replica's uploads, deletes and public marks); returns how many adapters changed. Reads the
        store, so it runs on a background thread (server/scale/sync.py), never on the event loop.
        Holds `_write_lock`, so no write of this process interleaves with it. A version that stops
        being published is discarded like a local delete: running requests keep it until they end."""
        changed = 0
        with self._write_lock:
            found = self.stores.scan()
            for ref, version in found.items():
                public = bool(self.stores.store(ref.tenant).access(ref.adapter_id).get("public", False))
                known = self.registry.resolve(ref)
                if known is not None and known.version == version:
                    if known.public != public:
                        with self._lock:
                            self.registry.register(replace(known, public=public))
                        changed += 1
                    continue
                try:
                    meta = self.stores.store(ref.tenant).meta(ref.adapter_id, version)["info"]
                    info = AdapterInfo.from_dict({**meta, "version": version, "tenant": ref.tenant, "public": public})
                except (AdapterError, KeyError, TypeError) as exc:  # e.g. deleted again meanwhile: next round
                    log.warning("adapter %s version %s not registered: %s", ref, version, exc)
                    continue
                with self._lock:
                    previous = self.registry.register(info)
                    self._published[version] += 1
                    if previous is not None:
                        self._unpublish(previous.version)
                changed += 1
            for info in self.registry.list():
                if info.ref not in found:
                    with self._lock:
                        if self.registry.remove(info.ref) is not None:
                            self._unpublish(info.version)
                    changed += 1
        return changed

    # ---- names and who may see what -----------------------------------------------------------
    @staticmethod
    def parse_name(name: str, caller: Principal) -> AdapterRef | None:
        """`id` is the caller's own adapter, `owner/id` anyone's; None when it cannot name one."""
        owner, slash, adapter_id = name.rpartition("/")
        try:
            return AdapterRef(validate_tenant(owner) if slash else caller.tenant, validate_adapter_id(adapter_id))
        except (ValueError, InvalidAdapterId):
            return None

    @staticmethod
    def may_use(info: AdapterInfo, caller: Principal) -> bool:
        return info.tenant == caller.tenant or info.public or caller.is_admin

    def get(self, name: str, caller: Principal = OPERATOR) -> AdapterInfo:
        """The adapter `name` as `caller` may see it; 404 otherwise (same answer as no such id)."""
        ref = self.parse_name(name, caller)
        info = None if ref is None else self.registry.resolve(ref)
        if info is None or not self.may_use(info, caller):
            raise AdapterNotFound(f"unknown adapter {name!r}")
        return info

    def visible(self, caller: Principal) -> list[AdapterInfo]:
        """What `caller` may list: its own adapters and the public ones (an admin: all)."""
        return [info for info in self.registry.list() if self.may_use(info, caller)]

    def _owned(self, name: str, caller: Principal) -> AdapterInfo:
        """`name` for a change: the owner's own adapter, or any for an admin; 404 for what the caller
        cannot see, 403 for a public adapter of another tenant (it can see that one exists)."""
        info = self.get(name, caller)
        if info.tenant != caller.tenant and not caller.is_admin:
            raise Forbidden(f"adapter {name!r} belongs to tenant {info.tenant!r}; only its owner may change it")
        return info

    # ---- writes -------------------------------------------------------------------------------
    def submit_upload(
        self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes, owner: str = DEFAULT_TENANT
    ) -> Future[AdapterInfo]:
        """Run `upload` on the low-priority upload worker."""
        return self._upload_worker.submit(self.upload, adapter_id, config_bytes, weights_bytes, owner)

    def upload(
        self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes, owner: str = DEFAULT_TENANT
    ) -> AdapterInfo:
        """Publish (or replace) `owner`'s adapter `adapter_id`."""
        validate_adapter_id(adapter_id)
        ref = AdapterRef(validate_tenant(owner), adapter_id)
        with self.turns.background():
            parsed = parse_adapter(config_bytes, weights_bytes, self.spec)
            # VeRA/RandLoRA keep only their trained vectors (projections come back from the seed).
            files = canonical_files(config_bytes, weights_bytes, parsed)
        # The version is the content digest, computed by the store while it writes (one hash pass).
        meta = AdapterInfo.from_parsed(adapter_id, "", parsed, created_at=time.time()).to_dict()
        for key in ("version", "tenant", "public"):  # the store's layout and ACCESS file say these
            del meta[key]
        meta["bytes"] = sum(len(data) for data in files.values())
        store = self.stores.store(owner)
        with self._write_lock:
            self._check_storage_quota(ref, meta["bytes"])
            version = store.publish(adapter_id, files, {"info": meta})  # fsyncs: never in a turn
            public = bool(store.access(adapter_id).get("public", False))
            info = AdapterInfo.from_dict({**meta, "version": version, "tenant": owner, "public": public})
            with self._lock:
                self.cache.put(version, parsed)
                previous = self.registry.register(info)
                self._published[version] += 1
                if previous is not None:
                    self._unpublish(previous.version)
            if previous is not None and previous.version != version:
                self._remove_files(ref, previous.version)
        log.info("adapter %s version %s published (%s, rank %d)", ref, version, info.kind, info.rank)
        return info

    def _check_storage_quota(self, ref: AdapterRef, new_bytes: int) -> None:
        limits = self.limits(ref.tenant)
        count, used = self.registry.usage(ref.tenant)
        replaced = self.registry.resolve(ref)
        if replaced is not None:  # a re-upload replaces the id's current version
            count, used = count - 1, used - replaced.bytes
        if count + 1 > limits.max_adapters:
            raise LimitExceeded(
                "max_adapters",
                f"tenant {ref.tenant!r} stores {count} adapters, its limit (max_adapters); delete one first",
                STORAGE_RETRY_AFTER_S,
            )
        if used + new_bytes > limits.max_adapter_bytes:
            raise LimitExceeded(
                "max_adapter_bytes",
                f"tenant {ref.tenant!r} stores {used} bytes of adapters; this one ({new_bytes} bytes) would pass "
                f"its limit of {limits.max_adapter_bytes} (max_adapter_bytes)",
                STORAGE_RETRY_AFTER_S,
            )

    def delete(self, name: str, caller: Principal = OPERATOR) -> AdapterInfo:
        with self._write_lock:
            with self._lock:
                info = self._owned(name, caller)
                self.registry.remove(info.ref)
                self._unpublish(info.version)
            self.cache.wait_settled(info.version)
            self.stores.store(info.tenant).delete(info.adapter_id)
        return info

    def set_public(self, name: str, public: bool, caller: Principal = OPERATOR) -> AdapterInfo:
        """Admins only: make an adapter usable by every tenant (still writable by its owner only)."""
        if not caller.is_admin:
            self.get(name, caller)  # 404 before 403: a user learns nothing about others' ids
            raise Forbidden("only an admin may change whether an adapter is public")
        with self._write_lock:
            info = self.get(name, caller)
            store = self.stores.store(info.tenant)
            store.set_access(info.adapter_id, {**store.access(info.adapter_id), "public": public})
            with self._lock:
                current = self.registry.resolve(info.ref)
                if current is None:
                    raise AdapterNotFound(f"unknown adapter {name!r}")
                info = replace(current, public=public)
                self.registry.register(info)
        return info

    def _remove_files(self, ref: AdapterRef, version: str) -> None:
        """Remove a replaced version's files once no request waits for the loader to read them
        (requests already holding its weights in memory keep them)."""
        self.cache.wait_settled(version)
        self.stores.store(ref.tenant).remove_version(ref.adapter_id, version)

    def _unpublish(self, version: str) -> None:
        """One id stopped publishing `version` (called with self._lock held)."""
        self._published[version] -= 1
        if self._published[version] <= 0:
            del self._published[version]
            # Dropped now, or when the last request that resolved it finishes.
            self.cache.discard(version)

    def drain_uploads(self) -> None:
        """Wait until every upload accepted so far is published or refused (server shutdown)."""
        self._upload_worker.submit(lambda: None).result()  # one FIFO worker: runs after them all

    # ---- the request path ---------------------------------------------------------------------
    def resolve(self, name: str, caller: Principal = OPERATOR) -> str:
        """The current version of the adapter `name` as `caller` sees it, held for the caller until
        the engine finishes its request (`HostCache.release`). In-memory only: a version not in
        memory is queued for the loader."""
        return self.resolve_info(name, caller).version

    def resolve_info(self, name: str, caller: Principal = OPERATOR) -> AdapterInfo:
        """`resolve`, returning the whole AdapterInfo of the version it holds."""
        with self._lock:
            info = self.get(name, caller)
            if not self.cache.hold(info.version):
                self.loader.request(info.ref, info.version)
            return info

    def _fetch(self, ref: AdapterRef, version: str) -> dict[str, bytes]:
        """One stored version's files, checked against their digests (a loader's reader thread: disk
        I/O never runs in a turn)."""
        return self.stores.store(ref.tenant).read(ref.adapter_id, version)

    def _parse_stored(self, files: dict[str, bytes]) -> ParsedAdapter:
        """Parse a stored version in its turn between engine steps (the loader thread)."""
        with self.turns.background():
            return parse_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], self._stored_spec)
