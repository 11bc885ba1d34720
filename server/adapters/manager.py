"""Engine-side adapter state: slot table, the packed weights in each slot, resident projection
families, and the per-step plan every AdaptedLinear applies.

Runs on the engine thread only. The scheduler pins versions into slots as it admits sequences;
before each forward, `load_pending` packs the newly assigned versions into their slots.

`backend` ("torch" | "triton") is decided once at startup by the caller. With "triton", LoRA-family
adapters are also written into per-layer slot buffers and RandLoRA λ/Γ into per-family stacks (the
layouts the kernels read), the per-step buffers are allocated once for `max_step_tokens`, and `plan`
returns a `TritonAdapterBatch`; kernels.batch_triton is imported only then, so the torch path never
loads triton.
"""

from __future__ import annotations

import torch

from kernels.batch import AdapterBatch, FamilyRows, TokenGroup
from kernels.backend import BACKENDS
from kernels.lora import LinearFactors, RandLoraSlice, VeraSlice
from kernels.segments import StepBuffers
from kernels.shared_bases import RandLoraStack, VeraStack
from kernels.slot_store import LoraSlotStore
from server.adapters.families import FamilyCache
from server.adapters.frozen_base import FrozenBase
from server.adapters.host_cache import HostCache
from server.adapters.merge import WeightMerger
from server.adapters.packing import pack_adapter
from server.adapters.slot_table import SlotTable
from server.model.layers import AdaptedLinear


class AdapterManager:
    def __init__(self, table: SlotTable, cache: HostCache, linears: list[AdaptedLinear], base: FrozenBase,
                 dtype: torch.dtype, device: torch.device | str = "cpu", backend: str = "torch",
                 max_step_tokens: int = 2048) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}, expected one of {BACKENDS}")
        self.table = table
        self.cache = cache
        self.linears = linears
        self.dtype = dtype
        self.device = device
        self.families = FamilyCache(dtype, device)
        self.merger = WeightMerger(linears, base)
        num = table.num_slots
        self.slot_factors: list[dict[str, LinearFactors] | None] = [None] * num
        self.slot_family: list[tuple[str, str] | None] = [None] * num   # (kind, family key) or None
        self._linears = {linear.key: linear for linear in linears}
        # VeRA vectors of every slot, stacked per family and packed layer so one gather serves a step.
        self._vera: dict[str, dict[str, VeraStack]] = {}
        # RandLoRA projections each family adapts, with every slot's λ/Γ stacked for the kernels on the
        # triton backend (None on the torch backend, which multiplies by each slot's U instead).
        self._randlora: dict[str, dict[str, dict[tuple[int, int], RandLoraStack | None]]] = {}
        self.loads = 0
        self.backend = backend
        self.lora_slots: LoraSlotStore | None = None
        self.step_buffers: StepBuffers | None = None
        if backend == "triton":
            from kernels.batch_triton import TritonAdapterBatch
            self._triton_batch = TritonAdapterBatch
            self.lora_slots = LoraSlotStore(linears, num, dtype, device)
            self.step_buffers = StepBuffers(max_step_tokens, num, device)

    # ---- loading ---------------------------------------------------------------------------
    def load_pending(self) -> None:
        for version, slot in self.table.take_loads():
            self._unload(slot)
            parsed = self.cache.get(version)
            bases = None if parsed.family is None else self.families.attach(parsed, slot)
            factors = pack_adapter(parsed, self.linears, self.dtype, self.device, bases,
                                   randlora_u=self.backend == "torch")
            self.slot_factors[slot] = factors
            if parsed.family is not None:
                key = parsed.family.key()
                self.slot_family[slot] = (parsed.family.kind, key)
                self._register_family_slices(key, slot, factors)
            elif self.lora_slots is not None:
                self.lora_slots.write(slot, factors)
            self.loads += 1

    def _unload(self, slot: int) -> None:
        previous = self.slot_family[slot]
        if previous is not None:
            for stack in self._vera.get(previous[1], {}).values():
                stack.clear(slot)
            for per_layer in self._randlora.get(previous[1], {}).values():
                for stack in per_layer.values():
                    if stack is not None:
                        stack.clear(slot)
            self.families.detach(slot)
            if self.families.get(previous[1]) is None:
                self._vera.pop(previous[1], None)
                self._randlora.pop(previous[1], None)
        self.slot_factors[slot] = None
        self.slot_family[slot] = None
        if self.lora_slots is not None:
            self.lora_slots.clear(slot)

    def _register_family_slices(self, key: str, slot: int, factors: dict[str, LinearFactors]) -> None:
        num = self.table.num_slots
        for layer_key, linear in factors.items():
            for piece in linear.slices:
                where = (piece.out_start, piece.out_features)
                if isinstance(piece, VeraSlice):
                    per_family = self._vera.setdefault(key, {})
                    if layer_key not in per_family:
                        out_slices = [(s.out_start, s.out_features) for s in self._linears[layer_key].slices]
                        per_family[layer_key] = VeraStack(out_slices, num, piece.lambda_d.shape[0], self.dtype,
                                                          self.device)
                    per_family[layer_key].write(slot, where, piece.lambda_d, piece.lambda_b)
                elif isinstance(piece, RandLoraSlice):
                    per_layer = self._randlora.setdefault(key, {}).setdefault(layer_key, {})
                    stack = per_layer.get(where)
                    if stack is None and self.backend == "triton":
                        (r, nb), min_l = piece.lam.shape, piece.gamma.shape[1]
                        stack = RandLoraStack.empty(num, r, nb, min_l, piece.in_le_out, self.device)
                    per_layer[where] = stack
                    if stack is not None:
                        stack.write(slot, piece.lam, piece.gamma, piece.scale)

    # ---- FamilyLayers protocol (used by AdapterBatch) --------------------------------------
    def vera_stack(self, family: str, layer_key: str) -> VeraStack | None:
        return self._vera.get(family, {}).get(layer_key)

    def randlora_stacks(self, family: str, layer_key: str) -> dict[tuple[int, int], RandLoraStack | None]:
        return self._randlora.get(family, {}).get(layer_key, {})

    def bases(self, family: str, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.families.get(family).layer(out_f, in_f)

    # ---- merged phases ------------------------------------------------------------------------
    @property
    def merged_version(self) -> str | None:
        return self.merger.state.version

    def merge(self, version: str) -> float:
        """Write `version` into the weights (raises CannotMerge); its tokens then need no delta."""
        return self.merger.merge(version, self.cache.get(version))

    def restore(self) -> float:
        return self.merger.restore()

    def slot_of(self, version: str | None) -> int:
        """-1 for the base model and for the adapter currently merged into the weights."""
        if version is None or version == self.merger.state.version:
            return -1
        slot = self.table.slot_of(version)
        assert slot is not None, f"version {version} is running without a slot"
        return slot

    def order_key(self, slot: int) -> tuple[str, int]:
        """Sort key that makes each projection family's tokens contiguous."""
        family = self.slot_family[slot] if slot >= 0 else None
        return ("" if family is None else family[1], slot)

    def plan(self, groups: list[TokenGroup], num_tokens: int, decode_only: bool = False) -> AdapterBatch | None:
        """The step's adapter work: `groups` of its `num_tokens` packed rows (`decode_only`: one token per
        sequence, which the Triton backend serves with its per-token kernel form)."""
        if not groups:
            return None
        lora_groups = [g for g in groups if self.slot_family[g.slot] is None]
        by_family: dict[tuple[str, str], list[TokenGroup]] = {}
        for g in groups:
            if self.slot_family[g.slot] is not None:
                by_family.setdefault(self.slot_family[g.slot], []).append(g)
        families = [_family_rows(kind, key, members, self.device) for (kind, key), members in by_family.items()]
        if self.lora_slots is not None:
            return self._triton_batch(lora_groups, families, self.slot_factors, self, self.lora_slots,
                                      self.step_buffers, num_tokens, decode_only)
        return AdapterBatch(lora_groups, families, self.slot_factors, self)

    def finished(self, version: str | None) -> None:
        """A request of `version` ended (in any state); drop its host-cache hold."""
        if version is not None:
            self.cache.release(version)


def _family_rows(kind: str, key: str, groups: list[TokenGroup], device: torch.device | str) -> FamilyRows:
    members, offset = [], 0
    for g in groups:
        members.append((slice(offset, offset + g.end - g.start), g.slot))
        offset += g.end - g.start
    contiguous = all(a.end == b.start for a, b in zip(groups, groups[1:]))
    rows = (slice(groups[0].start, groups[-1].end) if contiguous
            else torch.tensor([i for g in groups for i in range(g.start, g.end)], device=device))
    token_slots = torch.tensor([g.slot for g in groups for _ in range(g.start, g.end)], device=device)
    span = (min(g.start for g in groups), max(g.end for g in groups))
    return FamilyRows(kind, key, rows, token_slots, members, span)
