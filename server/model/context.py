"""Everything one forward pass needs to know about the batch, built once per step by the runner.

KV addressing is by *cache row* (block * block_size + offset, see server/engine/kv_cache.py): each
new token is written at its row, and attention reads a sequence's positions 0..n-1 at the rows its
block table gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.layers import AdapterDelta


@dataclass(frozen=True, slots=True)
class PrefillSegment:
    """A run of consecutive prompt tokens of one sequence (a whole prompt or a chunk of it)."""

    token_start: int  # first row of this segment in the packed token batch
    num_tokens: int
    start_pos: int  # position of the first token (> 0 for later chunks, or after a cached prefix)
    kv_rows: torch.Tensor  # [start_pos + num_tokens] cache rows of the sequence's positions 0..


@dataclass(slots=True)
class ForwardContext:
    """Packed batch layout: decode tokens first (one per sequence, grouped by adapter), then
    prefill segments."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    write_rows: torch.Tensor  # [T] int64, the cache row each new token's K/V goes to
    num_decode: int  # the first num_decode rows are single-token decodes
    decode_rows: torch.Tensor | None  # [num_decode, L] cache rows each decode reads (padded: null block)
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, L] bool, True where a position is the sequence's
    prefills: list[PrefillSegment]
    logits_rows: torch.Tensor  # [S] rows whose next-token logits are needed
    cos: torch.Tensor | None = None  # [T, 1, head_dim], filled by the model from its RoPE tables
    sin: torch.Tensor | None = None
    adapters: AdapterDelta | None = None

    @classmethod
    def prefills_only(
        cls,
        prompts: list[torch.Tensor],
        adapters: AdapterDelta | None = None,
        all_logits: bool = True,
        device: torch.device | str = "cpu",
    ) -> ForwardContext:
        """Whole prompts prefilled at once into a scratch cache of sum(len) rows (prompt i at the rows
        after prompt i-1's): for exact one-off forwards outside the engine (tests, conversion)."""
        segments, start = [], 0
        for prompt in prompts:
            rows = torch.arange(start, start + len(prompt), device=device)
            segments.append(PrefillSegment(start, len(prompt), 0, rows))
            start += len(prompt)
        ends = torch.tensor([s.token_start + s.num_tokens - 1 for s in segments], device=device)
        return cls(
            input_ids=torch.cat(prompts).to(device),
            positions=torch.cat([torch.arange(len(p)) for p in prompts]).to(device),
            write_rows=torch.arange(start, device=device),
            num_decode=0,
            decode_rows=None,
            decode_mask=None,
            prefills=segments,
            logits_rows=torch.arange(start, device=device) if all_logits else ends,
            adapters=adapters,
        )
