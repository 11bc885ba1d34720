"""Tenants in the store: one `AdapterStore` per tenant, under `<root>/<tenant>/`.

Layout::

    <root>/<tenant>/<adapter_id>/CURRENT ...   # each tenant's directory is an AdapterStore root
    <root>/<tenant>/<adapter_id>/ACCESS        # {"public": true} when an admin made it public

Ids are per tenant (two tenants can each have `my-lora`); ownership is where the files are, so it
survives restarts with no index to keep in step. A store written before tenants existed kept
adapters directly under `<root>/<adapter_id>/`: `scan()` moves each of those (one rename) into the
default tenant's directory.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidAdapterId
from .store import CURRENT, HELPER_THREADS, TMP_PREFIX, AdapterStore, _rmtree, validate_adapter_id

DEFAULT_TENANT = "default"
"""The tenant of a server without API keys, and the owner of adapters stored before tenants."""

_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_tenant(tenant: str) -> str:
    """Tenant names are directory names: the adapter id rules."""
    if not isinstance(tenant, str) or not _TENANT_RE.match(tenant) or ".." in tenant:
        raise ValueError(f"invalid tenant {tenant!r}: must match {_TENANT_RE.pattern} and not contain '..'")
    return tenant


@dataclass(frozen=True, slots=True, order=True)
class AdapterRef:
    """An adapter's full name: its owner and its id within the owner's adapters."""

    tenant: str
    adapter_id: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.adapter_id}"


class TenantStores:
    def __init__(self, root: Path, direct_io: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.direct_io = direct_io
        self._lock = threading.Lock()
        self._stores: dict[str, AdapterStore] = {}
        # One pool of hashing/fsync helpers for every tenant's store (threads start on demand).
        self._helpers = ThreadPoolExecutor(HELPER_THREADS, thread_name_prefix="adapter-store")

    def store(self, tenant: str) -> AdapterStore:
        validate_tenant(tenant)
        with self._lock:
            store = self._stores.get(tenant)
            if store is None:
                store = AdapterStore(self.root / tenant, self.direct_io, helpers=self._helpers)
                self._stores[tenant] = store
            return store

    def scan(self) -> dict[AdapterRef, str]:
        """Startup recovery of every tenant's store: {ref: current version} (see AdapterStore.scan)."""
        self._adopt_untenanted()
        found: dict[AdapterRef, str] = {}
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(TMP_PREFIX):
                _rmtree(entry)  # an in-flight write of a store from before tenants
                continue
            if not entry.is_dir() or entry.is_symlink():
                continue
            try:
                validate_tenant(entry.name)
            except ValueError:
                continue  # not ours: never touched
            for adapter_id, version in self.store(entry.name).scan().items():
                found[AdapterRef(entry.name, adapter_id)] = version
        return found

    def _adopt_untenanted(self) -> None:
        """Move adapters stored before tenants (`<root>/<id>/CURRENT`) into the default tenant."""
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.is_symlink() or not (entry / CURRENT).is_file():
                continue
            try:
                validate_adapter_id(entry.name)
            except InvalidAdapterId:
                continue
            target = self.root / DEFAULT_TENANT / entry.name
            if target.exists():
                continue  # both exist: keep the tenant's, leave the old one for the operator
            target.parent.mkdir(exist_ok=True)
            os.replace(entry, target)
