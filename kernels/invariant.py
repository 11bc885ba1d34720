"""Batch-invariant products: a row's result depends on that row's data only, never on how many rows share
the call, where the row sits, or how long the other rows' contexts are.

Why this is needed (measured on an AVX-512/AMX Xeon, torch CPU): MKL's sgemm gives row 0 of x Wᵀ other
bits at M = 1..15 than at M ≥ 16, and oneDNN's bf16 matmul other bits at M = 33..256 than at M ≤ 32 for
the 49152-wide lm_head: the library picks its kernel and blocking by M. At a fixed M = 16 every row gets
the same bits wherever it sits in the tile. So in invariant mode every matmul a token goes through runs
in tiles of exactly `TILE` rows (the last padded with zeros): one call for a decode step of ≤ 16
sequences, and a token's bits are the same in a decode step, a prefill chunk of any size, alone or not.

Attention (`attend`) reduces in one order per token fixed by its own positions: scores are products
summed over head_dim (a reduction whose size is the head size), the softmax's max is exact in any order,
and both sums over positions are `cumsum`s — a sequential scan, so the zeros that padding (positions
past a sequence's end, keys of other sequences' lengths, the causal part of a prefill chunk) adds after
a token's last position leave its sums' bits unchanged. It computes in float32 for every model dtype.

The switch is per thread (`mode`): the engine's runner turns it on around its forward pass when the server
runs with batch invariance, and other forwards in the process (conversion reports) are left as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

TILE = 16  # rows per matmul call; the smallest M at which MKL's fp32 per-row results stop changing

_state = threading.local()


@contextmanager
def mode(on: bool) -> Iterator[None]:
    """Batch-invariant products and attention (on) or the library's fastest (off) in this thread."""
    before = enabled()
    _state.on = on
    try:
        yield
    finally:
        _state.on = before


def enabled() -> bool:
    return getattr(_state, "on", False)


def _tiles(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [M, K] padded with zero rows to a multiple of TILE, and M."""
    rows = x.shape[0]
    pad = -rows % TILE
    return (F.pad(x, (0, 0, 0, pad)) if pad else x), rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K], in row tiles of TILE when invariant mode is on."""
    if not enabled() or x.shape[0] == TILE:
        return F.linear(x, weight, bias)
    padded, rows = _tiles(x)
    return torch.cat([F.linear(t, weight, bias) for t in padded.split(TILE)])[:rows]


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a [M, K], in row tiles of TILE when invariant mode is on."""
    if not enabled() or a.shape[0] == TILE:
        return a @ b
    padded, rows = _tiles(a)
    return torch.cat([t @ b for t in padded.split(TILE)])[:rows]


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of each query over the positions it may see, in an order fixed per query.

    q [n, KVH, G, D] (G query heads share each KV head); keys, values [b, L, KVH, D] with b = n (each
    query its own positions: decode) or b = 1 (all queries share them: a prefill chunk); visible [n, L]
    bool. Returns [n, KVH, G, D] in q's dtype.
    """
    keys = keys.float().permute(0, 2, 1, 3).unsqueeze(2)  # [b, KVH, 1, L, D]
    values = values.float().permute(0, 2, 1, 3).unsqueeze(2)
    scores = (q.float().unsqueeze(3) * keys).sum(-1) * scale  # [n, KVH, G, L]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    weights = (scores - scores.amax(-1, keepdim=True)).exp()  # exactly 0 where not visible
    total = weights.cumsum(-1)[..., -1:]  # [n, KVH, G, 1]
    out = (weights.unsqueeze(-1) * values).cumsum(-2)[..., -1, :]  # [n, KVH, G, D]
    return (out / total).to(q.dtype)
