"""Torch reference ops for adapters built on shared random bases (VeRA, RandLoRA).

All adapters of one projection family share the same frozen bases, so the expensive products with
the bases are done once for every token of the family, and only small per-adapter factors are
gathered per token. `rows` selects the family's tokens in the packed batch: a slice when they are
contiguous, else an index tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Rows = slice | torch.Tensor


@dataclass(slots=True)
class RandLoraStack:
    """Every slot's trained RandLoRA factors for one projection of one family, stacked so a kernel can
    gather them per token (the Triton backend's layout; the torch path uses each slot's U instead).

    lam [max_slots, r, nb] fp32 (randlora_lambda), gamma [max_slots, nb, min] fp32 (randlora_gamma),
    scales [max_slots] fp32 (randlora_alpha / r, 0 for a slot that holds no adapter of the family).
    """

    in_le_out: bool
    lam: torch.Tensor
    gamma: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def empty(cls, num_slots: int, r: int, nb: int, min_l: int, in_le_out: bool,
              device: torch.device | str = "cpu") -> "RandLoraStack":
        f32 = dict(dtype=torch.float32, device=device)
        return cls(in_le_out, torch.zeros(num_slots, r, nb, **f32), torch.zeros(num_slots, nb, min_l, **f32),
                   torch.zeros(num_slots, **f32))

    def write(self, slot: int, lam: torch.Tensor, gamma: torch.Tensor, scale: float) -> None:
        self.lam[slot].copy_(lam)
        self.gamma[slot].copy_(gamma)
        self.scales[slot] = scale

    def clear(self, slot: int) -> None:
        self.lam[slot].zero_()
        self.gamma[slot].zero_()
        self.scales[slot] = 0.0


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _add_rows(y: torch.Tensor, rows: Rows, delta: torch.Tensor) -> None:
    if isinstance(rows, slice):
        y[rows] += delta
    else:
        y.index_add_(0, rows, delta)


def vera_family_ref(x: torch.Tensor, y: torch.Tensor, rows: Rows, A_l: torch.Tensor, B_l: torch.Tensor,
                    lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> None:
    """y[rows] += λ_b[t] ⊙ ((λ_d[t] ⊙ (x[rows] A_lᵀ)) B_lᵀ)   — two shared products, two per-token scalings.

    x [T, in]; y [T, out] (the projection's columns); A_l [r, in], B_l [out, r] (family bases, PEFT's
    slices); lambda_d [n, r], lambda_b [n, out]: each of the n family tokens' own adapter vectors.
    """
    h = _take(x, rows) @ A_l.T                  # [n, r]   shared by every adapter of the family
    u = (lambda_d * h) @ B_l.T                  # [n, out] shared
    _add_rows(y, rows, lambda_b * u)


def randlora_family_ref(x: torch.Tensor, y: torch.Tensor, rows: Rows, members: list, V: torch.Tensor) -> None:
    """For each adapter g of the family (its rows within the family's tokens, its RandLoraSlice with
    U_g [r·nb, min] and scale s_g; None when g does not adapt this projection):
    in ≤ out:  y[rows_g] += ((x[rows_g] U_gᵀ) Vᵀ) · s_g        (the Vᵀ product shared by the family)
    in > out:  y[rows_g] += ((x[rows_g] V) U_g) · s_g           (the V product shared by the family)

    V [max_l, nb·r] is the family's flattened basis, already sliced to this layer (PEFT's pairing of
    U's rows with V's columns, ADAPTERS.md §4.3).
    """
    xf = _take(x, rows)                                                    # [n, in]
    in_le_out = next(p.in_le_out for _, p in members if p is not None)
    if in_le_out:
        h = torch.zeros(xf.shape[0], V.shape[1], dtype=xf.dtype, device=xf.device)   # [n, r·nb]
        for g_rows, piece in members:
            if piece is not None:
                h[g_rows] = xf[g_rows] @ piece.U.T
        delta = h @ V.T                                                    # [n, out]
    else:
        p = xf @ V                                                         # [n, r·nb]
        delta = torch.zeros(xf.shape[0], members_out(members), dtype=xf.dtype, device=xf.device)
        for g_rows, piece in members:
            if piece is not None:
                delta[g_rows] = p[g_rows] @ piece.U
    for g_rows, piece in members:
        if piece is not None:
            delta[g_rows] *= piece.scale
    _add_rows(y, rows, delta)


def members_out(members: list) -> int:
    return next(p.U.shape[1] for _, p in members if p is not None)
