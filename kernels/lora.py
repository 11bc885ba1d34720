"""Low-rank adapter factors as the forward pass consumes them, and the torch reference op.

One adapter's weights for one (possibly packed) linear layer are a `LinearFactors`: per adapted
projection, its A, its transposed B (unscaled), its scale, and the optional lora bias and DoRA
output scale. Every adapter keeps its own rank: nothing is padded to a maximum.

The op order is PEFT's, `(x Aᵀ) Bᵀ · s`, one projection at a time: stacking the A's of q/k/v into
one matmul changes the BLAS summation order and costs bit-exactness (measured: 6e-5 logit drift on
SmolLM2 against 0.0 for the per-projection form).
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch


@dataclass(slots=True)
class SliceFactors:
    """One projection's share of a packed layer, for one adapter."""

    out_start: int                        # first output column of the projection in the packed layer
    out_features: int
    A: torch.Tensor                       # [rank, in]
    Bt: torch.Tensor                      # [rank, out_features] = Bᵀ, unscaled
    scale: float
    divisor: float = 1.0                  # AdaLoRA's (init_r + 1e-5), applied after the scale as PEFT does
    bias: torch.Tensor | None = None      # [out_features] lora_bias · scale
    output_scale: torch.Tensor | None = None  # [out_features] DoRA g = m / ‖W0 + s·BA‖_row

    At: torch.Tensor = None               # type: ignore[assignment]  # Aᵀ as a view (no copy), set below

    def __post_init__(self) -> None:
        # A transposed *view*: the same strides x @ A.T sees, so results stay bit-identical, without
        # building the view again in every layer of every step.
        self.At = self.A.T

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def fused_scale_is_exact(self) -> bool:
        """addmm(alpha=scale) rounds like PEFT's separate `· scale` only for powers of two."""
        mantissa, _ = math.frexp(self.scale)
        return self.divisor == 1.0 and mantissa == 0.5


@dataclass(slots=True)
class VeraSlice:
    """A VeRA adapter's vectors for one projection; the bases belong to its family."""

    out_start: int
    out_features: int
    lambda_d: torch.Tensor                # [r]
    lambda_b: torch.Tensor                # [out_features]


@dataclass(slots=True)
class RandLoraSlice:
    """A RandLoRA adapter's factors for one projection; A and V belong to its family.

    The torch path multiplies by U = (λ ⊙ A_l ⊙ Γ) flattened (PEFT's order), built once at load; the
    Triton path gathers λ and Γ per token instead and leaves U None (it is [r·nb, min]: for a square
    layer as large as the base weight, per adapter).
    """

    out_start: int
    out_features: int
    U: torch.Tensor | None                # [r·nb, min(in, out)] in the model dtype, or None
    scale: float
    in_le_out: bool
    lam: torch.Tensor                     # [r, nb] float32 (randlora_lambda)
    gamma: torch.Tensor                   # [nb, min] float32 (randlora_gamma)


AnySlice = SliceFactors | VeraSlice | RandLoraSlice


@dataclass(slots=True)
class LinearFactors:
    """One adapter's weights for one AdaptedLinear (slices of one kind)."""

    slices: list[AnySlice]

    @property
    def nbytes(self) -> int:
        fields = ("A", "Bt", "bias", "output_scale", "lambda_d", "lambda_b", "U", "lam", "gamma")
        tensors = [t for s in self.slices for f in fields if (t := getattr(s, f, None)) is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def lora_rows_ref(x: torch.Tensor, y: torch.Tensor, base_bias: torch.Tensor | None,
                  factors: LinearFactors) -> None:
    """In place, for the rows of one adapter and each adapted projection s (columns of y):
    y[:, s] += ((x A_sᵀ) B_sᵀ) · scale / divisor (+ bias_s)                (LoRA / rsLoRA / AdaLoRA)
    y[:, s] += (g_s − 1) ⊙ (y[:, s] − b0_s) + g_s ⊙ (x A_sᵀ) B_sᵀ · s.scale   (DoRA, PEFT's form)

    x [n, in], y [n, out] (a row-range view of the batch output), base_bias [out] or None.
    """
    for s in factors.slices:
        ys = y[:, s.out_start:s.out_start + s.out_features]
        shrunk = torch.mm(x, s.At)                                    # [n, rank]
        if s.output_scale is None:
            if s.fused_scale_is_exact:
                ys.addmm_(shrunk, s.Bt, alpha=s.scale)
            else:
                delta = (shrunk @ s.Bt).mul_(s.scale)
                ys.add_(delta if s.divisor == 1.0 else delta.div_(s.divisor))
            if s.bias is not None:
                ys.add_(s.bias)
            continue
        base = ys - base_bias[s.out_start:s.out_start + s.out_features] if base_bias is not None else ys.clone()
        g = s.output_scale
        ys.add_((g - 1) * base + g * (shrunk @ s.Bt) * s.scale)
