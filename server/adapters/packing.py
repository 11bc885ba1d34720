"""Bridges between the adapter domain and our model's packed layer layout."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from adapters_store import BaseModelSpec, ParsedAdapter, TargetLayer
from adapters_store.types import AnyFactors
from server.adapters.frozen_base import FrozenBase
from server.model.layers import AdaptedLinear, TargetSlice


def base_model_spec(linears: list[AdaptedLinear], base: FrozenBase, max_rank: int, max_bytes: int) -> BaseModelSpec:
    """Describe every targetable projection by its checkpoint path and shape; weights come from the
    frozen base, never from the live (possibly merged) layers."""
    layers = {
        s.path: TargetLayer(s.path, s.out_features, linear.in_features, linear.bias is not None)
        for linear in linears
        for s in linear.slices
    }
    return BaseModelSpec(layers=layers, weight=base.projection_weight, max_rank=max_rank, max_bytes=max_bytes)


def adapted_layers(
    parsed: ParsedAdapter, linears: list[AdaptedLinear]
) -> Iterator[tuple[AdaptedLinear, list[tuple[TargetSlice, AnyFactors]]]]:
    """Each AdaptedLinear the adapter targets, with its targeted projections (in the layer's packed order)
    and the adapter's canonical factors for each."""
    for linear in linears:
        pieces = [(s, f) for s in linear.slices if (f := parsed.layers.get(s.path)) is not None]
        if pieces:
            yield linear, pieces


def to_model(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
    """A canonical float32 tensor in the model dtype on `device`, contiguous."""
    return None if t is None else t.to(device=device, dtype=dtype).contiguous()
