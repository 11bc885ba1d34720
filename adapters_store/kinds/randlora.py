"""peft_type RANDLORA (docs/adapters.md §4): per-layer ``randlora_lambda [r, nb_l]`` and
``randlora_gamma [nb_l, min_l]``, scale ``randlora_alpha / r``.

Shared bases ``randlora_A (r, 1, min_dim)`` / ``randlora_B (max_dim, nb, r)``: dense ones are drawn
in bf16 (PEFT's choice on a CPU-only machine, docs/adapters.md §9.1), sparse ones in fp32. The per-layer
copies that save_projection=true writes are checked against the model-level ones and dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config_checks import get_bool, get_positive
from ..projections import ProjectionFamily, ceil_div_like_peft
from ..tensors import KEY_PREFIX, check_shape
from ..types import BaseModelSpec, ParsedAdapter, RandLoraFactors, TargetLayer
from .projected import ProjectedKind, parse_projected

_LAM, _GAMMA = "randlora_lambda", "randlora_gamma"


def _family(cfg: dict[str, Any], r: int, seed: int, dims: tuple[int, int]) -> ProjectionFamily:
    # very_sparse is checked first in PEFT's _pre_injection_hook, so it wins over sparse.
    if get_bool(cfg, "very_sparse"):
        sparsity = "very_sparse"
    elif get_bool(cfg, "sparse"):
        sparsity = "sparse"
    else:
        sparsity = "dense"
    dtype = "bfloat16" if sparsity == "dense" else "float32"
    return ProjectionFamily("randlora", seed, r, dims[0], dims[1], sparsity, dtype)


def _make_layer(alpha: float):
    def layer_factors(
        path: str, layer: TargetLayer, t: dict[str, torch.Tensor], fam: ProjectionFamily
    ) -> RandLoraFactors:
        key = KEY_PREFIX + path + "."
        min_l = min(layer.out_features, layer.in_features)
        nb = ceil_div_like_peft(min_l, fam.r)
        why = f"config r={fam.r}, nb=ceil(min(out, in)/r)={nb}"
        check_shape(key + _LAM, t[_LAM], (fam.r, nb), why)
        check_shape(key + _GAMMA, t[_GAMMA], (nb, min_l), why)
        # Same Python expression as RandLoraLayer.update_layer: bit-identical scale.
        return RandLoraFactors(
            lam=t[_LAM].contiguous(),
            gamma=t[_GAMMA].contiguous(),
            scale=alpha / fam.r,
            out_features=layer.out_features,
            in_features=layer.in_features,
        )

    return layer_factors


def parse_randlora(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base: BaseModelSpec,
    metadata: Mapping[str, str] | None = None,
) -> ParsedAdapter:
    spec = ProjectedKind(
        kind="randlora",
        label="RandLoRA",
        vectors=(_GAMMA, _LAM),
        r_default=32,
        family=_family,
        layer=_make_layer(get_positive(cfg, "randlora_alpha", 640)),
    )
    return parse_projected(cfg, tensors, base, metadata or {}, spec)
