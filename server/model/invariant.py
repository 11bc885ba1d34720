"""Batch-invariant attention over the paged cache (used when `kernels.invariant` is enabled).

Every token — a decode row, or any row of a prefill chunk — goes through `kernels.invariant.attend`
with the keys of its own sequence and a mask of the positions it may see, so its reduction order is
fixed by its own position: the same whether it is decoded alone, decoded beside sequences with longer
contexts (its row padded with the null block), or computed inside a prefill chunk of any size.
"""

from __future__ import annotations

import torch

from kernels.invariant import attend
from server.model.context import ForwardContext

QUERY_TILE = 16  # prefill queries per call: bounds the [n, heads, L, head_dim] products in memory


def attention(
    q: torch.Tensor, ctx: ForwardContext, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [T, H, D] (RoPE applied, this step's K/V already written); returns [T, H, D]."""
    tokens, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    q = q.view(tokens, kv_heads, heads // kv_heads, head_dim)
    out = torch.empty_like(q)
    if ctx.num_decode:
        rows, n = ctx.decode_rows, ctx.num_decode
        out[:n] = attend(q[:n], k_cache[rows], v_cache[rows], ctx.decode_mask[:, 0, 0, :], scale)
    for seg in ctx.prefills:
        keys, values = k_cache[seg.kv_rows].unsqueeze(0), v_cache[seg.kv_rows].unsqueeze(0)  # [1, L, KVH, D]
        positions = torch.arange(len(seg.kv_rows), device=q.device)
        for first in range(0, seg.num_tokens, QUERY_TILE):
            n = min(QUERY_TILE, seg.num_tokens - first)
            visible = positions <= (seg.start_pos + first + torch.arange(n, device=q.device))[:, None]
            rows = slice(seg.token_start + first, seg.token_start + first + n)
            out[rows] = attend(q[rows], keys, values, visible, scale)
    return out.view(tokens, heads, head_dim)
