"""peft_type ADALORA (docs/adapters.md §5), converted to plain low-rank factors.

File keys per module (ParameterDict entries, no ``.weight``): ``lora_A [r_l,in]``,
``lora_B [out,r_l]``, ``lora_E [r_l,1]``; r_l may be 0 after rank allocation.
PEFT: ΔW = B @ (A * E) * scaling / (ranknum + 1e-5), ranknum = init_r (a float32 tensor) and
scaling = lora_alpha if lora_alpha > 0 else r_l.  We serve A' = A * E and
B' = B * scaling / (ranknum + 1e-5), with the denominator built as the same float32 tensor.
``use_rslora`` and ``alpha_pattern`` are ignored, as in PEFT's AdaLoRA layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config_checks import check_common, get_bool, get_int, get_positive
from ..delta_size import check_lora_update
from ..errors import InvalidAdapter, UnsupportedAdapter
from ..targets import parse_targets
from ..tensors import KEY_PREFIX, check_shape, group_by_module
from ..types import BaseModelSpec, LayerFactors, ParsedAdapter
from .common import base_layer, check_rank, short_names

_A, _B, _E = "lora_A", "lora_B", "lora_E"


def _rank_pattern(cfg: dict[str, Any], init_r: int) -> dict[str, int] | None:
    """Saved masks, keyed by module path -> kept rank (sum of the mask)."""
    rp = cfg.get("rank_pattern")
    if rp is None:
        return None
    if not isinstance(rp, dict):
        raise InvalidAdapter(f"config field 'rank_pattern' must be an object or null, got {type(rp).__name__}")
    out: dict[str, int] = {}
    for k, mask in rp.items():
        if not (isinstance(mask, list) and all(isinstance(b, bool) for b in mask)):
            raise InvalidAdapter(f"rank_pattern[{k!r}] must be a list of booleans")
        if len(mask) != init_r:
            raise InvalidAdapter(f"rank_pattern[{k!r}] has length {len(mask)}, expected init_r={init_r}")
        path = k[: -len("." + _E)] if k.endswith("." + _E) else k
        out[path] = sum(mask)
    return out


def parse_adalora(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base: BaseModelSpec,
    metadata: Mapping[str, str] | None = None,
) -> ParsedAdapter:
    check_common(cfg)
    if get_bool(cfg, "use_dora"):
        raise UnsupportedAdapter("AdaLoRA with use_dora is not supported (PEFT rejects it too)")
    if get_bool(cfg, "lora_bias"):
        raise UnsupportedAdapter("AdaLoRA with lora_bias is not supported")
    init_r = get_int(cfg, "init_r", 12)
    # PEFT's AdaLoRA scales by r when lora_alpha is 0 (``lora_alpha if lora_alpha > 0 else r``), so 0
    # is a real setting here; a negative alpha only reaches that fallback by accident.
    alpha = get_positive(cfg, "lora_alpha", 8, allow_zero=True)
    pattern = _rank_pattern(cfg, init_r)
    targets = parse_targets(cfg, base)
    # ranknum is a float32 parameter filled with float(init_r); `+ 1e-5` happens in float32.
    denom = torch.tensor([float(init_r)], dtype=torch.float32) + 1e-5

    groups = group_by_module(tensors, (_A, _B, _E))
    layers: dict[str, LayerFactors] = {}
    for path, t in groups.items():
        layer = base_layer(base, path)
        key = KEY_PREFIX + path + "."
        for name in (_A, _B, _E):
            if name not in t:
                raise InvalidAdapter(f"module {path!r}: missing tensor {key + name!r}")
        A, B, E = t[_A], t[_B], t[_E]
        if A.ndim != 2:
            raise InvalidAdapter(f"tensor {key + _A!r} must be 2-D [r, in], got shape {list(A.shape)}")
        r = int(A.shape[0])
        check_shape(key + _A, A, (r, layer.in_features))
        check_shape(key + _B, B, (layer.out_features, r))
        check_shape(key + _E, E, (r, 1))
        if r > init_r:
            raise InvalidAdapter(f"module {path!r}: rank {r} exceeds init_r={init_r}")
        if pattern is not None and path in pattern:
            if pattern[path] != r:
                raise InvalidAdapter(
                    f"module {path!r}: tensor rank {r} does not match rank_pattern mask (sum {pattern[path]})"
                )
        elif r != init_r:
            # Without a mask PEFT loads the layer at init_r and would fail on a smaller tensor.
            raise InvalidAdapter(f"module {path!r}: rank {r} != init_r={init_r} and no rank_pattern entry")
        if r == 0:
            continue  # pruned by rank allocation: contributes exactly zero in PEFT
        check_rank(base, path, r)
        scaling = alpha if alpha > 0 else float(r)
        layers[path] = LayerFactors(
            A=(A * E).contiguous(), B=B.contiguous(), scale=float(scaling), divisor=float(denom.item())
        )
        src = f"lora_alpha={alpha!r}" if alpha > 0 else f"r={r} (lora_alpha=0)"
        check_lora_update(path, layers[path], base, f"scale {scaling:.3g} = {src} / (init_r={init_r} + 1e-5)")

    if not layers:
        raise InvalidAdapter("AdaLoRA adapter has no layer with rank > 0")
    targets.check_file(groups, base)  # rank-0 layers too: PEFT created them
    return ParsedAdapter(kind="adalora", layers=layers, target_modules=short_names(layers))
