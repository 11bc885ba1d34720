"""Bridges between the adapter domain and our model's packed layer layout."""

from __future__ import annotations

import torch

from adapters_store import BaseModelSpec, ParsedAdapter, TargetLayer
from kernels.lora import LinearFactors, SliceFactors
from server.model.layers import AdaptedLinear


def base_model_spec(linears: list[AdaptedLinear], max_rank: int, max_bytes: int) -> BaseModelSpec:
    """Describe every targetable projection by its checkpoint path and shape."""
    layers: dict[str, TargetLayer] = {}
    where: dict[str, tuple[AdaptedLinear, slice]] = {}
    for linear in linears:
        for s in linear.slices:
            layers[s.path] = TargetLayer(s.path, s.out_features, linear.in_features, linear.bias is not None)
            where[s.path] = (linear, slice(s.out_start, s.out_start + s.out_features))

    def weight(path: str) -> torch.Tensor:
        linear, rows = where[path]
        return linear.weight[rows]

    return BaseModelSpec(layers=layers, weight=weight, max_rank=max_rank, max_bytes=max_bytes)


def pack_adapter(parsed: ParsedAdapter, linears: list[AdaptedLinear], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> dict[str, LinearFactors]:
    """Lay one adapter out per AdaptedLinear (B transposed), in the model dtype on `device`."""
    def convert(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    packed: dict[str, LinearFactors] = {}
    for linear in linears:
        slices = [SliceFactors(s.out_start, s.out_features, convert(f.A), convert(f.B.T), f.scale, f.divisor,
                               convert(f.bias), convert(f.output_scale))
                  for s in linear.slices if (f := parsed.layers.get(s.path)) is not None]
        if slices:
            packed[linear.key] = LinearFactors(slices)
    return packed
