"""Torch reference ops for adapters built on shared random bases (VeRA, RandLoRA), and the per-slot
layouts they read.

All adapters of one projection family share the same frozen bases, so the expensive products with
the bases are done once for every token of the projection family, and only small per-adapter factors
are gathered per token. `rows` selects the projection family's tokens in the packed batch: a slice when
they are contiguous, else an index tensor.

What a step reads per packed layer (written at adapter load by the VeRA / RandLoRA slot stores, handed
to the step plan by reference, so nothing is looked up during the forward pass):
    VeRA:     `VeraLayer`  = the layer's `VeraStack` (every slot's λ_d, λ_b) + the bases A_l, B
    RandLoRA: one `RandLoraProjection` per adapted projection = its bases A_l, V + every slot's factors:
              `RandLoraSlice`s (U, scale; the torch path) or a `RandLoraStack` (λ, Γ, scale; Triton)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.invariant import mm  # a @ b, in fixed row tiles when batch-invariant

Rows = slice | torch.Tensor


class VeraStack:
    """Every slot's VeRA vectors for one packed layer of one projection family, stacked so one gather (torch) or one
    launch (Triton) serves all of the layer's projections:

        lambda_d [n_slices, max_slots, r]   λ_d of projection j (q/k/v or gate/up) for each slot
        lambda_b [max_slots, total_out]     λ_b laid out by the layer's packed output columns
        out_starts / out_sizes [n_slices] int32, active [n_slices] int32 (1 = some loaded slot adapts j)
    A slot that does not adapt projection j has zero vectors there and adds exactly nothing.
    """

    def __init__(
        self,
        out_slices: list[tuple[int, int]],
        num_slots: int,
        r: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.out_slices = list(out_slices)
        self.total_out = max(start + size for start, size in out_slices)
        self.max_out = max(size for _, size in out_slices)
        i32 = dict(dtype=torch.int32, device=device)
        self.lambda_d = torch.zeros(len(out_slices), num_slots, r, dtype=dtype, device=device)
        self.lambda_b = torch.zeros(num_slots, self.total_out, dtype=dtype, device=device)
        self.out_starts = torch.tensor([start for start, _ in out_slices], **i32)
        self.out_sizes = torch.tensor([size for _, size in out_slices], **i32)
        self.active = torch.zeros(len(out_slices), **i32)
        self._users: list[set[int]] = [set() for _ in out_slices]  # slots adapting each projection

    def write(self, slot: int, where: tuple[int, int], lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> None:
        j = self.out_slices.index(where)
        self.lambda_d[j, slot].copy_(lambda_d)
        self.lambda_b[slot, where[0] : where[0] + where[1]].copy_(lambda_b)
        self._users[j].add(slot)
        self.active[j] = 1

    def clear(self, slot: int) -> None:
        self.lambda_d[:, slot].zero_()
        self.lambda_b[slot].zero_()
        for j, users in enumerate(self._users):
            users.discard(slot)
            if not users:
                self.active[j] = 0

    def active_slices(self) -> list[tuple[int, tuple[int, int]]]:
        """(j, (out_start, out_features)) of the projections some loaded slot adapts."""
        return [(j, where) for j, where in enumerate(self.out_slices) if self._users[j]]


@dataclass(slots=True)
class RandLoraStack:
    """Every slot's trained RandLoRA factors for one projection of one projection family, stacked so a kernel can
    gather them per token (the Triton backend's layout; the torch path uses each slot's U instead).

    lam [max_slots, r, nb] fp32 (randlora_lambda), gamma [max_slots, nb, min] fp32 (randlora_gamma),
    scales [max_slots] fp32 (randlora_alpha / r, 0 for a slot that holds no adapter of the family).
    """

    in_le_out: bool
    lam: torch.Tensor
    gamma: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def empty(
        cls, num_slots: int, r: int, nb: int, min_l: int, in_le_out: bool, device: torch.device | str = "cpu"
    ) -> RandLoraStack:
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            in_le_out,
            torch.zeros(num_slots, r, nb, **f32),
            torch.zeros(num_slots, nb, min_l, **f32),
            torch.zeros(num_slots, **f32),
        )

    def write(self, slot: int, lam: torch.Tensor, gamma: torch.Tensor, scale: float) -> None:
        self.lam[slot].copy_(lam)
        self.gamma[slot].copy_(gamma)
        self.scales[slot] = scale

    def clear(self, slot: int) -> None:
        self.lam[slot].zero_()
        self.gamma[slot].zero_()
        self.scales[slot] = 0.0


@dataclass(slots=True)
class VeraLayer:
    """One packed layer of a VeRA projection family: every slot's vectors and the family's bases sliced
    to the layer (A_l [r, in], B [≥ max out_j, r]: B_l of projection j is B[:out_j])."""

    stack: VeraStack
    A_l: torch.Tensor
    B: torch.Tensor


@dataclass(slots=True)
class RandLoraSlice:
    """One RandLoRA adapter's factors for one projection, as the torch path multiplies by them:
    U = (λ ⊙ A_l ⊙ Γ) flattened (`randlora_u`, PEFT's order), built once at load, and the scale."""

    U: torch.Tensor  # [r·nb, min(in, out)] in the model dtype
    scale: float


@dataclass(slots=True)
class RandLoraProjection:
    """One projection (columns [out_start, out_start + out_features) of a packed layer) that some loaded
    adapter of a RandLoRA projection family adapts, with the family's bases sliced to it (PEFT's slices:
    A_l [r, 1, min], V [max, nb·r]) and every slot's factors in the layout of the backend: `pieces`
    (slot → RandLoraSlice or None, torch) or `stack` (Triton)."""

    out_start: int
    out_features: int
    A_l: torch.Tensor
    V: torch.Tensor
    pieces: list[RandLoraSlice | None] | None = None
    stack: RandLoraStack | None = None


def randlora_u(lam: torch.Tensor, gamma: torch.Tensor, A_l: torch.Tensor) -> torch.Tensor:
    """U = (λ[:, :, None] ⊙ A_l ⊙ Γ[None]) flattened to [r·nb, min], in float32, exactly as PEFT computes it
    on every forward (λ [r, nb], Γ [nb, min] float32; A_l [r, 1, min])."""
    return (lam[:, :, None] * A_l.float() * gamma[None]).flatten(end_dim=1)


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _add_rows(y: torch.Tensor, rows: Rows, delta: torch.Tensor) -> None:
    if isinstance(rows, slice):
        y[rows] += delta
    else:
        y.index_add_(0, rows, delta)


def vera_family_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: Rows,
    token_slots: torch.Tensor,
    A_l: torch.Tensor,
    B: torch.Tensor,
    stack: VeraStack,
) -> None:
    """For each projection j of the layer that the family adapts, with s = the token's slot:
        y[rows, cols_j] += λ_b[s, cols_j] ⊙ ((λ_d[j, s] ⊙ (x[rows] A_lᵀ)) B[:out_j]ᵀ)
    x A_lᵀ is one product for every projection and every adapter of the family (A_l depends only on
    the layer's input size); B[:out_j]ᵀ is one product per projection for all the family's tokens.

    x [T, in]; y [T, total_out] (the packed layer output); rows: the family's rows; token_slots [n]:
    their slots; A_l [r, in], B [≥ max out_j, r] (PEFT's slices: B_l of projection j is B[:out_j]).
    """
    h = mm(_take(x, rows), A_l.T)  # [n, r]   shared by the whole layer
    for j, (out_start, out_f) in stack.active_slices():
        lambda_d = stack.lambda_d[j].index_select(0, token_slots)
        lambda_b = stack.lambda_b[:, out_start : out_start + out_f].index_select(0, token_slots)
        u = mm(lambda_d * h, B[:out_f].T)  # [n, out] shared
        _add_rows(y[:, out_start : out_start + out_f], rows, lambda_b * u)


def randlora_family_ref(x: torch.Tensor, y: torch.Tensor, rows: Rows, members: list, V: torch.Tensor) -> None:
    """For each adapter g of the projection family (its rows within the family's tokens, its RandLoraSlice
    with U_g [r·nb, min] and scale s_g; None when g does not adapt this projection):
    in ≤ out:  y[rows_g] += ((x[rows_g] U_gᵀ) Vᵀ) · s_g        (the Vᵀ product shared by the family)
    in > out:  y[rows_g] += ((x[rows_g] V) U_g) · s_g           (the V product shared by the family)

    x [T, in]; y [T, out] (the projection's columns of the layer output); V [max_l, nb·r] is the
    family's flattened basis, already sliced to this layer (PEFT's pairing of U's rows with V's
    columns, docs/adapters.md §4.3).
    """
    if all(p is None for _, p in members):  # only another loaded adapter of the family targets this projection
        return
    xf = _take(x, rows)  # [n, in]
    if x.shape[1] <= y.shape[1]:  # in ≤ out
        h = torch.zeros(xf.shape[0], V.shape[1], dtype=xf.dtype, device=xf.device)  # [n, r·nb]
        for g_rows, piece in members:
            if piece is not None:
                h[g_rows] = mm(xf[g_rows], piece.U.T)
        delta = mm(h, V.T)  # [n, out]
    else:
        p = mm(xf, V)  # [n, r·nb]
        delta = torch.zeros(xf.shape[0], y.shape[1], dtype=xf.dtype, device=xf.device)
        for g_rows, piece in members:
            if piece is not None:
                delta[g_rows] = mm(p[g_rows], piece.U)
    for g_rows, piece in members:
        if piece is not None:
            delta[g_rows] *= piece.scale
    _add_rows(y, rows, delta)
