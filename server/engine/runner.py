"""Turns a scheduled batch into tensors, runs the model, and returns the logits to sample from.

Row layout of the packed batch: decode tokens first, grouped by adapter slot so each adapter's
tokens are one contiguous row range, then prefill segments (each contiguous already). KV is
addressed through each sequence's block table (cache row = block * block_size + offset).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kernels import invariant
from kernels.batch import TokenGroup
from server.adapters.manager import AdapterManager
from server.engine.block_pool import NULL_BLOCK
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.model.context import ForwardContext, PrefillSegment
from server.model.fused_decode import FusedDecoder
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
        batch_invariant: bool = False,
        fused: FusedDecoder | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.adapters = adapters
        self.observe_slot_load = observe_slot_load
        self.device = model.embed_tokens.weight.device
        self.batch_invariant = batch_invariant  # kernels/invariant.py: logits independent of the batch
        self.fused = fused  # compiled decode-only steps (server/model/fused_decode.py); None = always eager

    def prepare(self, batch: ScheduledBatch) -> ForwardContext:
        slot_of = {
            id(s): self.adapters.slot_of(s.request.adapter_version)
            for s in batch.decodes + [s for s, _ in batch.prefills]
        }
        order = self.adapters.order_key
        decodes = sorted(batch.decodes, key=lambda s: order(slot_of[id(s)]))
        size = self.kv_cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        write_rows: list[int] = []
        groups: list[TokenGroup] = []
        row_of: dict[int, int] = {}  # sequence -> row whose logits it samples from
        for row, seq in enumerate(decodes):
            pos = seq.num_computed
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            write_rows.append(seq.block_table[pos // size] * size + pos % size)
            row_of[id(seq)] = row
            _add_group(groups, slot_of[id(seq)], row, row + 1)
        prefills: list[PrefillSegment] = []
        for seq, n in batch.prefills:
            start, first_row = seq.num_computed, len(ids)
            rows = self._rows(seq.block_table, start + n)
            prefills.append(PrefillSegment(first_row, n, start, rows))
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            write_rows.extend(rows[start:].tolist())
            row_of[id(seq)] = first_row + n - 1
            _add_group(groups, slot_of[id(seq)], first_row, first_row + n)
        decode_rows, decode_mask = self._decode_layout(decodes)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return ForwardContext(
            input_ids=as_tensor(ids),
            positions=as_tensor(positions),
            write_rows=as_tensor(write_rows),
            num_decode=len(decodes),
            decode_rows=decode_rows,
            decode_mask=decode_mask,
            prefills=prefills,
            logits_rows=as_tensor([row_of[id(s)] for s in batch.sampled()]),
            adapters=self.adapters.plan(groups, len(ids), decode_only=not prefills),
        )

    def _rows(self, block_table: list[int], length: int) -> torch.Tensor:
        """Cache rows of positions [0, length) of a sequence."""
        size = self.kv_cache.block_size
        blocks = torch.tensor(block_table[: -(-length // size)], dtype=torch.long)
        return (blocks[:, None] * size + torch.arange(size)).flatten()[:length].to(self.device)

    def _decode_layout(self, decodes: list[Sequence]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cache rows each decode row reads [B, L] (padded with the null block's rows) and the mask
        of its real positions [B, 1, 1, L]."""
        if not decodes:
            return None, None
        size = self.kv_cache.block_size
        lengths = torch.tensor([s.num_computed + 1 for s in decodes])
        width = -(-int(lengths.max()) // size)
        tables = torch.full((len(decodes), width), NULL_BLOCK, dtype=torch.long)
        for i, seq in enumerate(decodes):
            used = seq.block_table[:width]
            tables[i, : len(used)] = torch.tensor(used, dtype=torch.long)
        max_len = int(lengths.max())
        rows = (tables[:, :, None] * size + torch.arange(size)).flatten(1)[:, :max_len]
        mask = torch.arange(max_len) < lengths[:, None]  # [B, L]
        return rows.to(self.device), mask[:, None, None, :].to(self.device)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Erase what earlier sequences left in these blocks before their new owners write them."""
        self.kv_cache.zero_blocks(blocks)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.sampled()), vocab] float32, on the CPU: sampling uses per-request CPU
        generators, so a seed gives the same tokens whatever device the model runs on."""
        loads_before, started = self.adapters.loads, time.perf_counter()
        self.adapters.load_pending()
        if self.adapters.loads > loads_before:
            self.observe_slot_load((time.perf_counter() - started) / (self.adapters.loads - loads_before))
        ctx = self.prepare(batch)
        # Batch-invariant steps always run eagerly: the compiled step's reductions depend on the batch.
        if self.fused is not None and not self.batch_invariant and self.fused.supports(ctx):
            logits = self.fused(ctx)
            if logits is not None:  # None: the compiled step refused it, so it runs eagerly below
                return logits.cpu()
        with invariant.mode(self.batch_invariant):
            return self.model(ctx, self.kv_cache.keys, self.kv_cache.values).cpu()
