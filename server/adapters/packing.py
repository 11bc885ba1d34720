"""Bridges between the adapter domain and our model's packed layer layout."""

from __future__ import annotations

import torch

from adapters_store import BaseModelSpec, LayerFactors, ParsedAdapter, RandLoraFactors, TargetLayer, VeraFactors
from kernels.lora import AnySlice, LinearFactors, RandLoraSlice, SliceFactors, VeraSlice
from server.adapters.families import FamilyBases
from server.adapters.frozen_base import FrozenBase
from server.model.layers import AdaptedLinear


def base_model_spec(linears: list[AdaptedLinear], base: FrozenBase, max_rank: int, max_bytes: int) -> BaseModelSpec:
    """Describe every targetable projection by its checkpoint path and shape; weights come from the
    frozen base, never from the live (possibly merged) layers."""
    layers = {s.path: TargetLayer(s.path, s.out_features, linear.in_features, linear.bias is not None)
              for linear in linears for s in linear.slices}
    return BaseModelSpec(layers=layers, weight=base.projection_weight, max_rank=max_rank, max_bytes=max_bytes)


def pack_adapter(parsed: ParsedAdapter, linears: list[AdaptedLinear], dtype: torch.dtype,
                 device: torch.device | str = "cpu", bases: FamilyBases | None = None,
                 randlora_u: bool = True) -> dict[str, LinearFactors]:
    """Lay one adapter out per AdaptedLinear, in the model dtype on `device`.

    LoRA family: A and Bᵀ per projection. VeRA: its two vectors. RandLoRA: λ and Γ (float32), and
    with `randlora_u` its scaled basis U, computed once here in float32 exactly as PEFT computes it on
    every forward (the torch path needs U; the Triton kernels gather λ and Γ instead).
    """
    def convert(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    def one_slice(start: int, out_f: int, in_f: int, f) -> AnySlice:
        if isinstance(f, LayerFactors):
            return SliceFactors(start, out_f, convert(f.A), convert(f.B.T), f.scale, f.divisor,
                                convert(f.bias), convert(f.output_scale))
        if isinstance(f, VeraFactors):
            return VeraSlice(start, out_f, convert(f.lambda_d), convert(f.lambda_b))
        assert isinstance(f, RandLoraFactors) and bases is not None
        U = None
        if randlora_u:
            A_l, _ = bases.layer(out_f, in_f)
            U = convert((f.lam[:, :, None] * A_l.float() * f.gamma[None]).flatten(end_dim=1))
        f32 = dict(device=device, dtype=torch.float32)
        return RandLoraSlice(start, out_f, U, f.scale, in_le_out=in_f <= out_f, lam=f.lam.to(**f32).contiguous(),
                             gamma=f.gamma.to(**f32).contiguous())

    packed: dict[str, LinearFactors] = {}
    for linear in linears:
        slices = [one_slice(s.out_start, s.out_features, linear.in_features, f)
                  for s in linear.slices if (f := parsed.layers.get(s.path)) is not None]
        if slices:
            packed[linear.key] = LinearFactors(slices)
    return packed
