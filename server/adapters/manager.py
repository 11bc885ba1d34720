"""Engine-side adapter state: which slot store holds each slot, the per-step plan, merged phases.

Runs on the engine thread only. The scheduler pins versions into slots as it admits sequences;
before each forward, `load_pending` hands each newly assigned version to the slot store of its kind
(`server.adapters.kinds.SLOT_STORES`), after clearing the slot in the store that held it before.
`plan` asks each store with tokens in the step for its part; the result is the model's AdapterDelta
and carries every tensor the kernels read.

`backend` ("torch" | "triton") is decided once at startup by the caller; each store lays its slots out
for it. With "triton", the per-step buffers (metadata and scratch, shared by every store's part) are
allocated once here for `max_step_tokens`; kernels.batch_triton is imported only then, so the torch
path never loads triton.
"""

from __future__ import annotations

import torch

from kernels.backend import BACKENDS
from kernels.batch import AdapterDelta, StepInputs, StepPlan, TokenGroup
from kernels.segments import StepBuffers
from server.adapters.frozen_base import FrozenBase
from server.adapters.host_cache import HostCache
from server.adapters.kinds import SLOT_STORES, SlotStore, StoreContext
from server.adapters.merge import WeightMerger
from server.adapters.slot_table import SlotTable
from server.model.layers import AdaptedLinear


class AdapterManager:
    def __init__(
        self,
        table: SlotTable,
        cache: HostCache,
        linears: list[AdaptedLinear],
        base: FrozenBase,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        backend: str = "torch",
        max_step_tokens: int = 2048,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}, expected one of {BACKENDS}")
        self.table = table
        self.cache = cache
        self.linears = linears
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self.merger = WeightMerger(linears, base)
        ctx = StoreContext(linears, table.num_slots, dtype, device, backend)
        # One instance per store class (the four LoRA-family kinds share one store).
        self.stores: dict[type[SlotStore], SlotStore] = {cls: cls(ctx) for cls in dict.fromkeys(SLOT_STORES.values())}
        self.store_of_slot: list[SlotStore | None] = [None] * table.num_slots
        self.step_buffers = StepBuffers(max_step_tokens, table.num_slots, device) if backend == "triton" else None
        self.loads = 0

    def store_for(self, kind: str) -> SlotStore:
        cls = SLOT_STORES.get(kind)
        if cls is None:
            raise ValueError(f"no slot store serves adapter kind {kind!r}")
        return self.stores[cls]

    # ---- loading ---------------------------------------------------------------------------
    def load_pending(self) -> None:
        for version, slot in self.table.take_loads():
            previous = self.store_of_slot[slot]
            if previous is not None:
                previous.clear(slot)
                self.store_of_slot[slot] = None
            parsed = self.cache.get(version)
            store = self.store_for(parsed.kind)
            store.write(slot, parsed)
            self.store_of_slot[slot] = store
            self.loads += 1

    # ---- merged phases ------------------------------------------------------------------------
    @property
    def merged_version(self) -> str | None:
        return self.merger.state.version

    def merge(self, version: str) -> float:
        """Write `version` into the weights (raises CannotMerge); its tokens then need no delta."""
        return self.merger.merge(version, self.cache.get(version))

    def restore(self) -> float:
        return self.merger.restore()

    # ---- steps ----------------------------------------------------------------------------------
    def slot_of(self, version: str | None) -> int:
        """-1 for the base model and for the adapter currently merged into the weights."""
        if version is None or version == self.merger.state.version:
            return -1
        slot = self.table.slot_of(version)
        assert slot is not None, f"version {version} is running without a slot"
        return slot

    def order_key(self, slot: int) -> tuple[str, int]:
        """Sort key that makes each projection family's tokens contiguous."""
        store = self.store_of_slot[slot] if slot >= 0 else None
        return ("" if store is None else store.order_key(slot), slot)

    def plan(self, groups: list[TokenGroup], num_tokens: int, decode_only: bool = False) -> AdapterDelta | None:
        """The step's adapter work: `groups` of its `num_tokens` packed rows (`decode_only`: one token per
        sequence, which the Triton backend serves with its per-token kernel form)."""
        if not groups:
            return None
        store_of_slot = self.store_of_slot
        stores = [store_of_slot[g.slot] for g in groups]
        step = StepInputs(num_tokens, decode_only, self.device, self.step_buffers)
        if stores.count(stores[0]) == len(stores):  # one kind's adapters only (the common case)
            parts = stores[0].plan(groups, step)
        else:
            by_store: dict[SlotStore, list[TokenGroup]] = {}
            for g, store in zip(groups, stores):
                by_store.setdefault(store, []).append(g)
            parts = [part for store, members in by_store.items() for part in store.plan(members, step)]
        return parts[0] if len(parts) == 1 else StepPlan(parts)

    def finished(self, version: str | None) -> None:
        """A request of `version` ended (in any state); drop its host-cache hold."""
        if version is not None:
            self.cache.release(version)
