"""Plain data types shared by the parser, the store and the server.

The canonical form of every supported adapter kind is a per-layer low-rank pair (A, B) and a
scale, so the serving kernels only ever see ``y += scale * (x A^T) B^T``.
DoRA additionally carries a per-output-row multiplier ``output_scale`` (see ``LayerFactors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True, slots=True)
class TargetLayer:
    """One adaptable ``nn.Linear`` of the base model."""

    path: str  # module path inside the base model, e.g. "model.layers.0.self_attn.q_proj"
    out_features: int
    in_features: int
    has_bias: bool


@dataclass(slots=True)
class BaseModelSpec:
    """What the server tells the parser about its loaded base model."""

    layers: dict[str, TargetLayer]  # all adaptable layers, keyed by path
    # path -> base weight W0 [out, in] (any float dtype). Only DoRA needs it (its row norms depend
    # on W0), so it is a callable: the server need not materialise copies for other kinds.
    weight: Callable[[str], torch.Tensor]
    max_rank: int = 256
    max_bytes: int = 512 * 2**20


@dataclass(slots=True)
class LayerFactors:
    """Canonical low-rank delta of one layer.

    LoRA family:  y = x W0^T + b0 + ((x A^T) B^T) * scale / divisor + bias
    DoRA:         y = output_scale * (x W0^T + scale * (x A^T) B^T) + b0
                  (``output_scale`` g = m / ||W0 + s*B0@A0||_row, computed once at parse time from the
                  server's base weight; PEFT recomputes it every forward from the same numbers.)
    """

    A: torch.Tensor  # [r, in] float32
    B: torch.Tensor  # [out, r] float32, unscaled: PEFT multiplies by the scale after the product,
    #                  and doing the same keeps our logits bit-identical to PEFT's
    scale: float = 1.0
    divisor: float = 1.0  # AdaLoRA: PEFT multiplies by alpha, then divides by (init_r + 1e-5)
    bias: torch.Tensor | None = None  # [out] float32 (lora_bias * scale) or None
    output_scale: torch.Tensor | None = None  # DoRA only, [out] float32

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def nbytes(self) -> int:
        tensors = (self.A, self.B, self.bias, self.output_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(slots=True)
class ParsedAdapter:
    kind: str  # "lora" | "rslora" | "adalora" | "dora"
    layers: dict[str, LayerFactors]  # key = TargetLayer.path; rank-0 AdaLoRA layers dropped
    target_modules: list[str]  # sorted short names present, e.g. ["k_proj", "q_proj"]

    def delta_weight(self, path: str) -> torch.Tensor:
        """Dense low-rank term ``B @ A`` [out, in] float32 (scale included).

        For LoRA / rsLoRA / AdaLoRA this is exactly PEFT's ``get_delta_weight``: W = W0 + ΔW.
        For DoRA it is only the *directional* update: the merged weight is NOT W0 + ΔW but
        ``output_scale[:, None] * (W0 + ΔW)``; use :meth:`merged_weight` for that.
        """
        f = self.layers[path]
        return (f.B @ f.A) * f.scale / f.divisor

    def merged_weight(self, path: str, base_weight: torch.Tensor) -> torch.Tensor:
        """Weight that replaces W0 when merging, in float32.

        LoRA family: W0 + ΔW.  DoRA: g[:, None] * (W0 + ΔW).  A lora_bias is not included here;
        see :meth:`merged_bias`.
        """
        f = self.layers[path]
        merged = base_weight.float() + (f.B @ f.A) * f.scale / f.divisor
        if f.output_scale is not None:
            merged = f.output_scale.view(-1, 1) * merged
        return merged

    def merged_bias(self, path: str, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        """Bias after merging (base bias + lora_bias*scale); DoRA leaves the base bias unscaled."""
        f = self.layers[path]
        if f.bias is None:
            return None if base_bias is None else base_bias.float()
        return f.bias.clone() if base_bias is None else base_bias.float() + f.bias

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.layers.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.layers.values())
