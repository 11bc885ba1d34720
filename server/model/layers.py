"""Building blocks of the decoder: RMSNorm and AdaptedLinear (the one place adapters enter the model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kernels import invariant


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like transformers, then scale in the model dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


@dataclass(frozen=True, slots=True)
class TargetSlice:
    """One adapter-targetable projection inside a (possibly packed) linear layer."""

    path: str  # module path in the Hugging Face checkpoint, e.g. "model.layers.3.self_attn.k_proj"
    out_start: int  # first output column of this projection in the packed weight
    out_features: int


class AdapterDelta(Protocol):
    """Per-step adapter plan: adds every active adapter's contribution to a layer's base output."""

    def apply(self, layer: AdaptedLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class AdaptedLinear(nn.Module):
    """y = x W0ᵀ (+ b) + Σ_adapters delta(x), for one linear layer that may pack several projections.

    q/k/v and gate/up are packed into one weight so the shared base matmul is a single op; `slices`
    says which output columns belong to which checkpoint projection, so adapters still target each
    projection by its checkpoint name.
    """

    def __init__(self, in_features: int, slices: list[TargetSlice], bias: bool, layer_index: int) -> None:
        super().__init__()
        out_features = sum(s.out_features for s in slices)
        self.in_features = in_features
        self.out_features = out_features
        self.slices = slices
        self.layer_index = layer_index
        self.key = slices[0].path  # unique per layer; adapters' per-layer factors are keyed by it
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, adapters: AdapterDelta | None = None) -> torch.Tensor:
        y = invariant.linear(x, self.weight, self.bias)  # [tokens, out]; F.linear unless batch-invariant
        if adapters is not None:
            y = adapters.apply(self, x, y)
        return y
