"""The KV cache tensors: per layer, one [num_blocks * block_size, kv_heads, head_dim] buffer for K and
one for V, addressed by *cache row* = block * block_size + offset (see block_pool.py for who owns
which block).

A step writes each new token's K/V at its row (one scatter per layer) and attention gathers the rows
of each sequence's positions through its block table; rows past a sequence's length, and padding,
read the null block (always zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.hf_config import ModelConfig

BLOCK_SIZE = 16  # token positions per block: small enough to waste little, large enough to hash cheaply


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


@dataclass(slots=True)
class KVCache:
    keys: list[torch.Tensor]  # per layer [num_blocks * block_size, KVH, D]
    values: list[torch.Tensor]
    block_size: int

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero what earlier sequences wrote into these blocks before new ones are given them."""
        if not blocks:
            return
        rows = (torch.tensor(blocks)[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
        rows = rows.to(self.keys[0].device)
        for cache in (*self.keys, *self.values):
            cache.index_fill_(0, rows, 0)

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        block_size: int = BLOCK_SIZE,
    ) -> KVCache:
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        # On CPU torch.zeros maps untouched pages lazily, so a large budget costs memory only as it fills.
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(keys, values, block_size)
