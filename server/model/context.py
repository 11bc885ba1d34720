"""Everything one forward pass needs to know about the batch, built once per step by the runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.layers import AdapterDelta


@dataclass(frozen=True, slots=True)
class PrefillSegment:
    """A run of consecutive prompt tokens of one sequence (a whole prompt or a chunk of it)."""

    token_start: int  # first row of this segment in the packed token batch
    num_tokens: int
    kv_slot: int  # the sequence's KV cache slot
    start_pos: int  # position of the first token (> 0 for later chunks of a long prompt)


@dataclass(slots=True)
class ForwardContext:
    """Packed batch layout: decode tokens first (one per sequence, grouped by adapter), then
    prefill segments."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    kv_slots: torch.Tensor  # [T] int64, KV slot of each token's sequence
    num_decode: int  # the first num_decode rows are single-token decodes
    decode_slots: torch.Tensor | slice  # KV slots of the decode rows; a slice when they are contiguous
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_ctx] bool, in KV-slot order
    decode_attn_order: torch.Tensor | None  # decode rows in KV-slot order; None = already in it
    prefills: list[PrefillSegment]
    logits_rows: torch.Tensor  # [S] rows whose next-token logits are needed
    cos: torch.Tensor | None = None  # [T, 1, head_dim], filled by the model from its RoPE tables
    sin: torch.Tensor | None = None
    adapters: AdapterDelta | None = None
