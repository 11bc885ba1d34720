"""In-memory, thread-safe index of published adapters (metadata only, no tensors)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .tenants import DEFAULT_TENANT, AdapterRef
from .types import ParsedAdapter


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    adapter_id: str
    version: str
    kind: str
    rank: int  # max rank over layers
    rank_counts: dict[int, int]  # rank -> number of layers with that rank (summary of uneven ranks)
    target_modules: list[str]
    num_layers: int
    bytes: int  # bytes the store keeps for this version (VeRA/RandLoRA: trained vectors only)
    created_at: float = field(default_factory=time.time)
    projection: str | None = None  # VeRA/RandLoRA: "seed" (regenerated) or "stored" (own projections)
    family: str | None = None  # VeRA/RandLoRA projection family key
    tenant: str = DEFAULT_TENANT  # the owner (where the files are; not kept in meta.json)
    public: bool = False  # usable by every tenant (set by an admin; kept in the store's ACCESS file)

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.adapter_id)

    @classmethod
    def from_parsed(
        cls, adapter_id: str, version: str, parsed: ParsedAdapter, created_at: float | None = None
    ) -> AdapterInfo:
        counts = Counter(f.rank for f in parsed.layers.values())
        return cls(
            adapter_id=adapter_id,
            version=version,
            kind=parsed.kind,
            rank=parsed.rank,
            rank_counts=dict(sorted(counts.items())),
            target_modules=list(parsed.target_modules),
            num_layers=len(parsed.layers),
            bytes=parsed.nbytes,
            created_at=time.time() if created_at is None else created_at,
            projection=getattr(parsed, "projection", None),
            family=None if getattr(parsed, "family", None) is None else parsed.family.key(),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rank_counts"] = {str(k): v for k, v in self.rank_counts.items()}  # JSON keys are strings
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterInfo:
        d = dict(d)
        d["rank_counts"] = {int(k): int(v) for k, v in d["rank_counts"].items()}
        return cls(**d)


class AdapterRegistry:
    """Every published adapter of every tenant, by `AdapterRef` (who may see which is the service's
    business, not the registry's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[AdapterRef, AdapterInfo] = {}

    def register(self, info: AdapterInfo) -> AdapterInfo | None:
        """Insert or replace; returns the previous info so the caller can retire its version."""
        with self._lock:
            prev = self._items.get(info.ref)
            self._items[info.ref] = info
            return prev

    def resolve(self, ref: AdapterRef) -> AdapterInfo | None:
        with self._lock:
            return self._items.get(ref)

    def remove(self, ref: AdapterRef) -> AdapterInfo | None:
        with self._lock:
            return self._items.pop(ref, None)

    def list(self, tenant: str | None = None) -> list[AdapterInfo]:
        """All adapters, or one tenant's, sorted by (tenant, id)."""
        with self._lock:
            return [self._items[k] for k in sorted(self._items) if tenant is None or k.tenant == tenant]

    def usage(self, tenant: str) -> tuple[int, int]:
        """(adapters, bytes) the tenant stores."""
        with self._lock:
            mine = [info for ref, info in self._items.items() if ref.tenant == tenant]
            return len(mine), sum(info.bytes for info in mine)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, ref: object) -> bool:
        with self._lock:
            return ref in self._items
