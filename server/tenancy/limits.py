"""Per-tenant limits (defaults from flags, overrides from a JSON file) and the gate that counts each
tenant's requests in flight against them.

A request is *in flight* from the moment the HTTP layer admits it until the engine finishes it (the
engine calls `RequestGate.leave` from `Request.on_finish`, exactly once per request, whatever way it
ends). In flight = running + queued, so a tenant may hold `max_running + max_queued` of them; the
scheduler enforces `max_running` itself when it admits work.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

from server.errors import LimitExceeded
from server.tenancy.principal import validate_tenant

REQUEST_RETRY_AFTER_S = 1  # requests finish within seconds: trying again soon may succeed
STORAGE_RETRY_AFTER_S = 60  # storage frees up only when the tenant deletes something


@dataclass(frozen=True, slots=True)
class TenantLimits:
    max_adapters: int = 1000
    """Adapters a tenant may store."""
    max_adapter_bytes: int = 10 * 2**30
    """Bytes of adapter files a tenant may store (the current version of each)."""
    max_running: int = 0
    """Sequences of the tenant running at once; 0 = as many as the engine has KV slots."""
    max_queued: int = 256
    """Requests of the tenant waiting beyond those running."""

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"tenant limit {f.name} must be a non-negative integer, not {value!r}")


class TenantPolicy:
    """The limits of each tenant: the defaults, overridden per tenant."""

    def __init__(self, defaults: TenantLimits, overrides: dict[str, TenantLimits] | None = None) -> None:
        defaults.validate()
        self.defaults = defaults
        self.overrides = dict(overrides or {})

    @classmethod
    def load(cls, path: Path | None, defaults: TenantLimits) -> TenantPolicy:
        """`path`: JSON `{"<tenant>": {"max_running": 8, ...}, ...}`; fields left out keep the defaults."""
        if path is None:
            return cls(defaults)
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"tenant limits file {path} is unreadable: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"tenant limits file {path}: expected a JSON object of tenant -> limits")
        known = {f.name for f in fields(TenantLimits)}
        overrides = {}
        for tenant, values in raw.items():
            validate_tenant(tenant)
            if not isinstance(values, dict) or set(values) - known:
                raise ValueError(f"tenant limits file {path}: {tenant!r} must map some of {sorted(known)} to integers")
            limits = replace(defaults, **values)
            limits.validate()
            overrides[tenant] = limits
        return cls(defaults, overrides)

    def limits(self, tenant: str) -> TenantLimits:
        return self.overrides.get(tenant, self.defaults)


class RequestGate:
    """Counts requests in flight per tenant and server-wide; refuses (429) past either limit."""

    def __init__(self, policy: TenantPolicy, engine_capacity: int, max_queued: int) -> None:
        self.policy = policy
        self.engine_capacity = engine_capacity  # sequences the engine runs at once (KV slots)
        self.max_queued = max_queued  # server-wide queue depth beyond those running
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._total = 0

    def running_cap(self, tenant: str) -> int:
        cap = self.policy.limits(tenant).max_running
        return min(cap, self.engine_capacity) if cap else self.engine_capacity

    def enter(self, tenant: str, count: int = 1) -> None:
        """Admit `count` requests of `tenant` or raise LimitExceeded naming the limit."""
        limits = self.policy.limits(tenant)
        with self._lock:
            held = self._in_flight.get(tenant, 0)
            tenant_cap = self.running_cap(tenant) + limits.max_queued
            if held + count > tenant_cap:
                raise LimitExceeded(
                    "max_queued",
                    f"tenant {tenant!r} has {held} requests in flight and asked for {count} more; its limit is "
                    f"{self.running_cap(tenant)} running + {limits.max_queued} queued (max_queued)",
                    REQUEST_RETRY_AFTER_S,
                )
            server_cap = self.engine_capacity + self.max_queued
            if self._total + count > server_cap:
                raise LimitExceeded(
                    "server_max_queued",
                    f"the server has {self._total} requests in flight; it holds {self.engine_capacity} running "
                    f"+ {self.max_queued} queued (--max-queued)",
                    REQUEST_RETRY_AFTER_S,
                )
            self._in_flight[tenant] = held + count
            self._total += count

    def leave(self, tenant: str, count: int = 1) -> None:
        with self._lock:
            left = self._in_flight.get(tenant, 0) - count
            if left < 0:
                raise RuntimeError(f"tenant {tenant!r} left more requests than it entered")
            if left:
                self._in_flight[tenant] = left
            else:
                self._in_flight.pop(tenant, None)
            self._total -= count

    def in_flight(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._total if tenant is None else self._in_flight.get(tenant, 0)
