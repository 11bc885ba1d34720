"""The KV cache tensors: one [slots, kv_heads, max_len, head_dim] buffer per layer for K and for V.

Per-sequence slots (not paged blocks): every running sequence owns one slot sized for the full
context, so attention reads a plain strided view and needs no block tables. The price is memory
reserved up front for `max_model_len` tokens per slot; the slot count is derived from the budget.

Isolation: decode attention reads every position up to the longest sequence of the batch and masks
the rest, but a masked position still enters the arithmetic (a -inf score times a NaN value is
NaN). So a slot whose sequence ended is wiped to zeros before anyone else can be given it: whatever
its previous sequence wrote (NaN, Inf, huge values from a broken adapter) can never reach another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.hf_config import ModelConfig


def bytes_per_slot(config: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
    return per_token * max_len


@dataclass(slots=True)
class KVCache:
    keys: list[torch.Tensor]  # per layer [slots, KVH, max_len, D]
    values: list[torch.Tensor]
    written: list[int]  # per KV slot: positions [0, written) may hold a sequence's data

    def note_written(self, kv_slot: int, end: int) -> None:
        if end > self.written[kv_slot]:
            self.written[kv_slot] = end

    def wipe(self, kv_slots: list[int]) -> None:
        """Zero what earlier sequences wrote into these slots (only the written prefix: cheap)."""
        for kv_slot in kv_slots:
            end, self.written[kv_slot] = self.written[kv_slot], 0
            if end:
                for cache in (*self.keys, *self.values):
                    cache[kv_slot, :, :end].zero_()

    @classmethod
    def allocate(
        cls, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> KVCache:
        shape = (num_slots, config.num_kv_heads, max_len, config.head_dim)
        # On CPU torch.zeros maps untouched pages lazily, so a large budget costs memory only as it fills.
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(keys, values, [0] * num_slots)
