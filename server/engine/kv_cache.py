"""The KV cache tensors: one [slots, kv_heads, max_len, head_dim] buffer per layer for K and for V.

Per-sequence slots (not paged blocks): every running sequence owns one slot sized for the full
context, so attention reads a plain strided view and needs no block tables. The price is memory
reserved up front for `max_model_len` tokens per slot; the slot count is derived from the budget.
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
    keys: list[torch.Tensor]     # per layer [slots, KVH, max_len, D]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "KVCache":
        shape = (num_slots, config.num_kv_heads, max_len, config.head_dim)
        # On CPU torch.zeros maps untouched pages lazily, so a large budget costs memory only as it fills.
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(keys, values)
