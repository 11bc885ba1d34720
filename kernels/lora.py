"""Low-rank adapter factors as the forward pass consumes them, and the torch reference op.

One adapter's weights for one (possibly packed) linear layer are a `LinearFactors`: the A factors of
all the projections the layer packs, stacked into one matrix so a single matmul shrinks for all of
them, and per projection the transposed B factor (scale folded in) plus the optional lora bias and
DoRA output scale. Every adapter keeps its own rank: nothing is padded to a maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SliceFactors:
    """One projection's share of a packed layer, for one adapter."""

    out_start: int                        # first output column of the projection in the packed layer
    out_features: int
    rank_start: int                       # its rows in LinearFactors.A
    rank: int
    Bt: torch.Tensor                      # [rank, out_features]  = (scale · B)ᵀ
    bias: torch.Tensor | None = None      # [out_features] lora_bias · scale
    output_scale: torch.Tensor | None = None  # [out_features] DoRA g = m / ‖W0 + s·BA‖_row


@dataclass(slots=True)
class LinearFactors:
    """One adapter's weights for one AdaptedLinear."""

    A: torch.Tensor                       # [Σ rank, in]: A of every adapted projection, stacked
    slices: list[SliceFactors]

    @property
    def nbytes(self) -> int:
        tensors = [self.A] + [t for s in self.slices for t in (s.Bt, s.bias, s.output_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def lora_rows_ref(x: torch.Tensor, y: torch.Tensor, base_bias: torch.Tensor | None,
                  factors: LinearFactors) -> None:
    """In place, for the rows of one adapter:  t = x Aᵀ;  for each slice s:
    y[:, s] += t[:, s.ranks] Bt_s (+ bias_s)          (LoRA / rsLoRA / AdaLoRA)
    y[:, s]  = g_s ⊙ (y[:, s] − b0_s + t[:, s.ranks] Bt_s) + b0_s      (DoRA)

    x [n, in], y [n, out] (a view into the batch output), base_bias [out] or None.
    """
    shrunk = x @ factors.A.T                                         # [n, Σ rank]
    for s in factors.slices:
        cols = slice(s.out_start, s.out_start + s.out_features)
        ys = y[:, cols]
        expanded = shrunk[:, s.rank_start:s.rank_start + s.rank]
        if s.output_scale is None:
            ys.addmm_(expanded, s.Bt)
            if s.bias is not None:
                ys.add_(s.bias)
            continue
        b0 = None if base_bias is None else base_bias[cols]
        if b0 is not None:
            ys.sub_(b0)
        ys.addmm_(expanded, s.Bt).mul_(s.output_scale)
        if b0 is not None:
            ys.add_(b0)
