"""peft_type LORA: plain LoRA, rsLoRA and DoRA (docs/adapters.md §2).

File keys per module: ``lora_A.weight [r,in]``, ``lora_B.weight [out,r]``, optionally
``lora_B.bias [out]`` (lora_bias) or ``lora_magnitude_vector [out]`` (DoRA).
Scale: alpha_l / r_l, or alpha_l / sqrt(r_l) with use_rslora; kept beside B (folded into the lora bias).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..config_checks import (
    as_positive,
    check_common,
    check_pattern_keys,
    get_bool,
    get_dict,
    get_int,
    get_positive,
    match_pattern,
)
from ..delta_size import check_lora_update
from ..errors import InvalidAdapter, UnsupportedAdapter
from ..targets import parse_targets
from ..tensors import KEY_PREFIX, check_shape, group_by_module
from ..types import BaseModelSpec, LayerFactors, ParsedAdapter
from .common import base_layer, check_rank, short_names
from .dora import dora_output_scale

_A, _B, _BIAS, _MAG = "lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"


def parse_lora(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base: BaseModelSpec,
    metadata: Mapping[str, str] | None = None,
) -> ParsedAdapter:
    check_common(cfg)
    r_default = get_int(cfg, "r", 8)
    alpha_default = get_positive(cfg, "lora_alpha", 8)
    use_rslora = get_bool(cfg, "use_rslora")
    use_dora = get_bool(cfg, "use_dora")
    lora_bias = get_bool(cfg, "lora_bias")
    if use_dora and lora_bias:
        raise UnsupportedAdapter("use_dora together with lora_bias is not supported (PEFT rejects it too)")
    rank_pattern = get_dict(cfg, "rank_pattern")
    alpha_pattern = get_dict(cfg, "alpha_pattern")
    check_pattern_keys("rank_pattern", rank_pattern)
    check_pattern_keys("alpha_pattern", alpha_pattern)
    alphas = {k: as_positive(v, f"alpha_pattern[{k!r}]") for k, v in alpha_pattern.items()}
    targets = parse_targets(cfg, base)

    groups = group_by_module(tensors, (_A, _B, _BIAS, _MAG))
    layers: dict[str, LayerFactors] = {}
    for path, t in groups.items():
        layer = base_layer(base, path)
        key = KEY_PREFIX + path + "."
        for name in (_A, _B):
            if name not in t:
                raise InvalidAdapter(f"module {path!r}: missing tensor {key + name!r}")
        if lora_bias and _BIAS not in t:
            raise InvalidAdapter(f"module {path!r}: lora_bias=true but {key + _BIAS!r} is missing")
        if not lora_bias and _BIAS in t:
            raise InvalidAdapter(f"unexpected tensor {key + _BIAS!r}: config has lora_bias=false")
        if use_dora and _MAG not in t:
            raise InvalidAdapter(f"module {path!r}: use_dora=true but {key + _MAG!r} is missing")
        if not use_dora and _MAG in t:
            raise InvalidAdapter(f"unexpected tensor {key + _MAG!r}: config has use_dora=false")

        A, B = t[_A], t[_B]
        if A.ndim != 2:
            raise InvalidAdapter(f"tensor {key + _A!r} must be 2-D [r, in], got shape {list(A.shape)}")
        r = int(A.shape[0])
        check_shape(key + _A, A, (r, layer.in_features))
        check_shape(key + _B, B, (layer.out_features, r))
        if r == 0:
            raise InvalidAdapter(f"module {path!r} has rank 0 ({key + _A!r} is empty)")
        rk = match_pattern(rank_pattern, path)
        expected_r = r_default if rk is None else rank_pattern[rk]
        if expected_r != r:
            src = "r" if rk is None else f"rank_pattern[{rk!r}]"
            raise InvalidAdapter(f"module {path!r}: tensor rank {r} does not match config {src}={expected_r!r}")
        check_rank(base, path, r)
        ak = match_pattern(alpha_pattern, path)
        alpha = alpha_default if ak is None else alphas[ak]
        # Same Python-float expression as LoraLayer.update_layer, so the scale is bit-identical.
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        src = "lora_alpha" if ak is None else f"alpha_pattern[{ak!r}]"
        scale_desc = f"scale {scale:.3g} = {src}={alpha!r} / {'sqrt(r)' if use_rslora else 'r'} (r={r})"

        bias = None
        if lora_bias:
            check_shape(key + _BIAS, t[_BIAS], (layer.out_features,))
            bias = (t[_BIAS] * scale).contiguous()
        output_scale = None
        if use_dora:
            check_shape(key + _MAG, t[_MAG], (layer.out_features,))
            # Uses the *unscaled* B, exactly as PEFT's forward does.
            output_scale = dora_output_scale(path, A, B, scale, t[_MAG], base.weight(path))
        layers[path] = LayerFactors(
            A=A.contiguous(), B=B.contiguous(), scale=scale, bias=bias, output_scale=output_scale
        )
        check_lora_update(path, layers[path], base, scale_desc, t.get(_MAG))

    if not layers:
        raise InvalidAdapter("adapter_model.safetensors contains no LoRA layers")
    targets.check_file(groups, base)
    kind = "dora" if use_dora else ("rslora" if use_rslora else "lora")
    return ParsedAdapter(kind=kind, layers=layers, target_modules=short_names(layers))
