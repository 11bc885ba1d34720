"""peft_type VERA (docs/adapters.md §3): per-layer ``vera_lambda_d [r]`` and ``vera_lambda_b [out]``.

Shared projections ``vera_A (r, max_in)`` / ``vera_B (max_out, r)`` come from the family (seed) or,
if they differ from the regenerated ones, from the upload (see ``projected.py``). No scaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..projections import ProjectionFamily
from ..tensors import KEY_PREFIX, check_shape
from ..types import BaseModelSpec, ParsedAdapter, TargetLayer, VeraFactors
from .projected import ProjectedKind, parse_projected

_B, _D = "vera_lambda_b", "vera_lambda_d"


def _family(cfg: dict[str, Any], r: int, seed: int, dims: tuple[int, int]) -> ProjectionFamily:
    # VeRA always draws in fp32 (torch default dtype), never sparse (docs/adapters.md §6.1 step 3).
    return ProjectionFamily("vera", seed, r, dims[0], dims[1], "dense", "float32")


def _layer(path: str, layer: TargetLayer, t: dict[str, torch.Tensor], fam: ProjectionFamily) -> VeraFactors:
    key = KEY_PREFIX + path + "."
    check_shape(key + _D, t[_D], (fam.r,), f"config r={fam.r}")
    check_shape(key + _B, t[_B], (layer.out_features,))
    return VeraFactors(lambda_d=t[_D].contiguous(), lambda_b=t[_B].contiguous(), in_features=layer.in_features)


VERA = ProjectedKind(kind="vera", label="VeRA", vectors=(_B, _D), r_default=256, family=_family, layer=_layer)


def parse_vera(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base: BaseModelSpec,
    metadata: Mapping[str, str] | None = None,
) -> ParsedAdapter:
    return parse_projected(cfg, tensors, base, metadata or {}, VERA)
