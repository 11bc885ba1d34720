"""Turns a scheduled batch into tensors, runs the model, and returns the logits to sample from.

Row layout of the packed batch: decode tokens first, grouped by adapter slot so each adapter's
tokens are one contiguous row range, then prefill segments (each contiguous already). Decode
attention wants rows in KV-slot order instead; the context carries that permutation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kernels.batch import TokenGroup
from server.adapters.manager import AdapterManager
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.model.context import ForwardContext, PrefillSegment
from server.model.llama import LlamaModel


def _add_group(groups: list[TokenGroup], slot: int, start: int, end: int) -> None:
    if slot < 0:
        return
    if groups and groups[-1].slot == slot and groups[-1].end == start:
        groups[-1] = TokenGroup(slot, groups[-1].start, end)
    else:
        groups.append(TokenGroup(slot, start, end))


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        adapters: AdapterManager,
        observe_slot_load: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.adapters = adapters
        self.observe_slot_load = observe_slot_load
        self.device = model.embed_tokens.weight.device

    def prepare(self, batch: ScheduledBatch) -> ForwardContext:
        slot_of = {
            id(s): self.adapters.slot_of(s.request.adapter_version)
            for s in batch.decodes + [s for s, _ in batch.prefills]
        }
        order = self.adapters.order_key
        decodes = sorted(batch.decodes, key=lambda s: (order(slot_of[id(s)]), s.kv_slot))
        ids: list[int] = []
        positions: list[int] = []
        kv_slots: list[int] = []
        groups: list[TokenGroup] = []
        row_of: dict[int, int] = {}  # sequence -> row whose logits it samples from
        for row, seq in enumerate(decodes):
            ids.append(seq.token_ids[seq.num_computed])
            positions.append(seq.num_computed)
            kv_slots.append(seq.kv_slot)
            self.kv_cache.note_written(seq.kv_slot, seq.num_computed + 1)
            row_of[id(seq)] = row
            _add_group(groups, slot_of[id(seq)], row, row + 1)
        prefills: list[PrefillSegment] = []
        for seq, n in batch.prefills:
            start, first_row = seq.num_computed, len(ids)
            prefills.append(PrefillSegment(first_row, n, seq.kv_slot, start))
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            kv_slots.extend([seq.kv_slot] * n)
            self.kv_cache.note_written(seq.kv_slot, start + n)
            row_of[id(seq)] = first_row + n - 1
            _add_group(groups, slot_of[id(seq)], first_row, first_row + n)
        decode_slots, decode_mask, attn_order = self._decode_layout(decodes)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return ForwardContext(
            input_ids=as_tensor(ids),
            positions=as_tensor(positions),
            kv_slots=as_tensor(kv_slots),
            num_decode=len(decodes),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            decode_attn_order=attn_order,
            prefills=prefills,
            logits_rows=as_tensor([row_of[id(s)] for s in batch.sampled()]),
            adapters=self.adapters.plan(groups, len(ids), decode_only=not prefills),
        )

    def _decode_layout(
        self, decodes: list[Sequence]
    ) -> tuple[torch.Tensor | slice, torch.Tensor | None, torch.Tensor | None]:
        """KV slots of the decode rows in KV-slot order (a slice when contiguous), their key mask,
        and the row permutation into that order (None when rows already are in it)."""
        if not decodes:
            return slice(0, 0), None, None
        order = sorted(range(len(decodes)), key=lambda i: decodes[i].kv_slot)
        slot_ids = [decodes[i].kv_slot for i in order]
        device = self.device
        lengths = [decodes[i].num_computed + 1 for i in order]
        contiguous = slot_ids == list(range(slot_ids[0], slot_ids[0] + len(slot_ids)))
        slots = slice(slot_ids[0], slot_ids[-1] + 1) if contiguous else torch.tensor(slot_ids, device=device)
        mask = torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device).unsqueeze(1)  # [B, L]
        attn_order = None if order == list(range(len(order))) else torch.tensor(order, device=device)
        return slots, mask[:, None, None, :], attn_order

    def wipe_kv(self, kv_slots: list[int]) -> None:
        """Erase what finished sequences left in these KV slots before anyone else can read them."""
        self.kv_cache.wipe(kv_slots)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.sampled()), vocab] float32, on the CPU: sampling uses per-request CPU
        generators, so a seed gives the same tokens whatever device the model runs on."""
        loads_before, started = self.adapters.loads, time.perf_counter()
        self.adapters.load_pending()
        if self.adapters.loads > loads_before:
            self.observe_slot_load((time.perf_counter() - started) / (self.adapters.loads - loads_before))
        ctx = self.prepare(batch)
        return self.model(ctx, self.kv_cache.keys, self.kv_cache.values).cpu()
