"""Turns a scheduled batch into tensors, runs the model, and returns the logits to sample from."""

from __future__ import annotations

import torch

from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledBatch
from server.model.context import ForwardContext, PrefillSegment
from server.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache

    def prepare(self, batch: ScheduledBatch) -> ForwardContext:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        for row, seq in enumerate(batch.decodes):
            ids.append(seq.token_ids[seq.num_computed])
            positions.append(seq.num_computed)
            slots.append(seq.kv_slot)
            logits_rows.append(row)
        prefills: list[PrefillSegment] = []
        for seq, n in batch.prefills:
            start = seq.num_computed
            prefills.append(PrefillSegment(len(ids), n, seq.kv_slot, start))
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend([seq.kv_slot] * n)
            if start + n == seq.num_prompt:
                logits_rows.append(len(ids) - 1)
        num_decode = len(batch.decodes)
        decode_slots, decode_mask = self._decode_layout(batch)
        return ForwardContext(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            kv_slots=torch.tensor(slots, dtype=torch.long),
            num_decode=num_decode,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=prefills,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long),
        )

    @staticmethod
    def _decode_layout(batch: ScheduledBatch) -> tuple[torch.Tensor | slice, torch.Tensor | None]:
        if not batch.decodes:
            return slice(0, 0), None
        slot_ids = [s.kv_slot for s in batch.decodes]          # sorted by the scheduler
        lengths = torch.tensor([s.num_computed + 1 for s in batch.decodes])
        contiguous = slot_ids == list(range(slot_ids[0], slot_ids[0] + len(slot_ids)))
        slots = slice(slot_ids[0], slot_ids[-1] + 1) if contiguous else torch.tensor(slot_ids)
        mask = torch.arange(int(lengths.max())) < lengths.unsqueeze(1)   # [B, L]
        return slots, mask[:, None, None, :]

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.sampled()), vocab] float32."""
        ctx = self.prepare(batch)
        return self.model(ctx, self.kv_cache.keys, self.kv_cache.values)
