"""LoRA-family factors as the forward pass consumes them, and THE torch reference of the LoRA-family op.

One adapter's weights for one (possibly packed) linear layer are a `LinearFactors`: per adapted
projection, its A, its transposed B (unscaled), its scale, and the optional lora bias and DoRA
output scale. Every adapter keeps its own rank: nothing is padded to a maximum.

`lora_rows_ref` is the one torch statement of the LoRA / rsLoRA / AdaLoRA / DoRA forward delta: the
CPU path runs it, and the slot-buffer reference the Triton kernels are tested against
(`kernels.segments.lora_shrink_expand_ref`) calls it on views of the slot buffers. The Triton expand
epilogue (`kernels.lora_triton._expand_epilogue`) is its compiled twin.

The op order is PEFT's, `(x Aᵀ) Bᵀ · s`, one projection at a time: stacking the A's of q/k/v into
one matmul changes the BLAS summation order and costs bit-exactness (measured: 6e-5 logit drift on
SmolLM2 against 0.0 for the per-projection form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kernels import invariant


@dataclass(slots=True)
class SliceFactors:
    """One projection's share of a packed layer, for one LoRA-family adapter."""

    out_start: int  # first output column of the projection in the packed layer
    out_features: int
    A: torch.Tensor  # [rank, in]
    Bt: torch.Tensor  # [rank, out_features] = Bᵀ, unscaled
    scale: float
    divisor: float = 1.0  # AdaLoRA's (init_r + 1e-5), applied after the scale as PEFT does
    bias: torch.Tensor | None = None  # [out_features] lora_bias · scale
    output_scale: torch.Tensor | None = None  # [out_features] DoRA g = m / ‖W0 + s·BA‖_row

    # Derived once here, read by every layer of every step:
    At: torch.Tensor = field(init=False, default=None)  # type: ignore[assignment]  # Aᵀ as a view (no copy)
    fused_scale_is_exact: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        # A transposed *view*: the same strides x @ A.T sees, so results stay bit-identical, without
        # building the view again in every layer of every step.
        self.At = self.A.T
        # addmm(alpha=scale) rounds like PEFT's separate `· scale` only for powers of two.
        mantissa, _ = math.frexp(self.scale)
        self.fused_scale_is_exact = self.divisor == 1.0 and mantissa == 0.5

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(slots=True)
class LinearFactors:
    """One LoRA-family adapter's weights for one AdaptedLinear."""

    slices: list[SliceFactors]
    _float32: LinearFactors | None = field(init=False, default=None, repr=False, compare=False)

    def float32(self) -> LinearFactors:
        """These factors in float32 (self when they are), built once: what `LoraRows` computes with on a
        CPU in bf16 (see there)."""
        if all(s.A.dtype == torch.float32 for s in self.slices):
            return self
        if self._float32 is None:
            f32 = lambda t: None if t is None else t.float()  # noqa: E731
            self._float32 = LinearFactors(
                [
                    SliceFactors(
                        s.out_start,
                        s.out_features,
                        f32(s.A),
                        f32(s.Bt),
                        s.scale,
                        s.divisor,
                        f32(s.bias),
                        f32(s.output_scale),
                    )
                    for s in self.slices
                ]
            )
        return self._float32

    @property
    def nbytes(self) -> int:
        tensors = [t for s in self.slices for t in (s.A, s.Bt, s.bias, s.output_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def lora_rows_ref(x: torch.Tensor, y: torch.Tensor, base_bias: torch.Tensor | None, factors: LinearFactors) -> None:
    """In place, for the rows of one adapter and each adapted projection s (columns of y):
    y[:, s] += ((x A_sᵀ) B_sᵀ) · scale / divisor                         (LoRA / rsLoRA / AdaLoRA)
    y[:, s] += (g_s − 1) ⊙ (y[:, s] − b0_s) + g_s ⊙ (x A_sᵀ) B_sᵀ · scale   (DoRA, PEFT's form)
    then y[:, s] += bias_s when the adapter has a lora bias.

    x [n, in], y [n, out] (a row-range view of the batch output), base_bias [out] or None.
    """
    for s in factors.slices:
        ys = y[:, s.out_start : s.out_start + s.out_features]
        shrunk = invariant.mm(x, s.At)  # [n, rank]; torch.mm unless batch-invariant
        if s.output_scale is None:
            if s.fused_scale_is_exact and not invariant.enabled():
                ys.addmm_(shrunk, s.Bt, alpha=s.scale)
            else:
                delta = invariant.mm(shrunk, s.Bt).mul_(s.scale)
                ys.add_(delta if s.divisor == 1.0 else delta.div_(s.divisor))
        else:
            base = ys - base_bias[s.out_start : s.out_start + s.out_features] if base_bias is not None else ys.clone()
            g = s.output_scale
            ys.add_((g - 1) * base + g * invariant.mm(shrunk, s.Bt) * s.scale)
        if s.bias is not None:
            ys.add_(s.bias)
