"""Parsing shared by the kinds with shared random projections: VeRA and RandLoRA (docs/adapters.md §3, §4, §6).

File layout: per-layer trained tensors ``base_model.model.<path>.<name>``, optional model-level
projections ``base_model.<kind>_A/B`` (save_projection=true) and, for RandLoRA, full per-layer
copies ``base_model.model.<path>.<kind>_A/B`` of the model-level ones.

Projection policy (docs/adapters.md §10): uploaded projections are compared with the regenerated ones;
equal -> dropped (seed family); different -> kept as the adapter's own (stored family).
Canonical files (``canonical.py``) drop seed projections and record the family key in the
safetensors metadata, so a config that says save_projection=true still re-parses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..config_checks import check_common, get_bool, get_int
from ..errors import InvalidAdapter, UnsupportedAdapter
from ..projections import ProjectionFamily, projection_digest, shared_projections
from ..targets import Targets, parse_targets
from ..tensors import KEY_PREFIX, group_by_module
from ..types import AnyFactors, BaseModelSpec, ParsedAdapter, TargetLayer
from .common import base_layer, short_names

MODEL_PREFIX = "base_model."
# safetensors metadata key written by canonical_files: the family key of the adapter.
CANONICAL_META_KEY = "adapters_store.projection_family"
_MAX_SEED = 2**64  # torch.Generator.manual_seed accepts [0, 2**64) for non-negative seeds

# (cfg, r, seed, (max_out, max_in)) -> family without digest
FamilyBuilder = Callable[[dict[str, Any], int, int, tuple[int, int]], ProjectionFamily]
# (path, base layer, {suffix: tensor}, family) -> factors; checks shapes
LayerBuilder = Callable[[str, TargetLayer, dict[str, torch.Tensor], ProjectionFamily], AnyFactors]


@dataclass(frozen=True, slots=True)
class ProjectedKind:
    kind: str  # "vera" | "randlora"
    label: str  # "VeRA" | "RandLoRA", for messages
    vectors: tuple[str, ...]  # per-layer trained tensor names, e.g. ("vera_lambda_b", "vera_lambda_d")
    r_default: int
    family: FamilyBuilder
    layer: LayerBuilder

    @property
    def proj_names(self) -> tuple[str, str]:
        return f"{self.kind}_A", f"{self.kind}_B"


def _config(cfg: dict[str, Any], base: BaseModelSpec, spec: ProjectedKind) -> tuple[int, int, bool]:
    check_common(cfg)  # bias must be "none", no modules_to_save, fan_in_fan_out is a bool ...
    r = get_int(cfg, "r", spec.r_default)
    seed = get_int(cfg, "projection_prng_key", 0, minimum=0)
    if seed >= _MAX_SEED:
        raise InvalidAdapter(f"config field 'projection_prng_key' must be < 2**64, got {seed}")
    if r > base.max_rank:
        raise UnsupportedAdapter(f"{spec.label} adapter has rank r={r}, the server's max_rank is {base.max_rank}")
    return r, seed, get_bool(cfg, "save_projection", True)


def _split(
    tensors: dict[str, torch.Tensor], spec: ProjectedKind
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(per-layer tensors, model-level projections by name)."""
    keys = {MODEL_PREFIX + n: n for n in spec.proj_names}
    model_level = {keys[k]: v for k, v in tensors.items() if k in keys}
    rest = {k: v for k, v in tensors.items() if k not in keys}
    return rest, model_level


def _check_coverage(targets: Targets, base: BaseModelSpec, paths: set[str], dims: tuple[int, int], label: str) -> None:
    """PEFT sizes the projections over the layers the *config* targets (``_find_dim``); we size them over
    the layers in the file. For PEFT-saved files the two agree. Reject a file whose missing layers
    would change the projection shapes (not checkable when target_modules is missing: PEFT's default)."""
    selected = targets.config_layers(base)
    missing = [] if selected is None else sorted(selected - paths)
    if not missing:
        return
    out = max([dims[0]] + [base.layers[p].out_features for p in missing])
    inn = max([dims[1]] + [base.layers[p].in_features for p in missing])
    if (out, inn) != dims:
        raise InvalidAdapter(
            f"{label} config target_modules also targets {missing[:3]} (not in the file); PEFT would size "
            f"the shared projections as max (out, in)={(out, inn)}, the file's layers give {dims}"
        )


def _projections(
    spec: ProjectedKind,
    family: ProjectionFamily,
    model_level: dict[str, torch.Tensor],
    copies: dict[str, dict[str, torch.Tensor]],
    save_projection: bool,
    metadata: Mapping[str, str],
) -> tuple[ProjectionFamily, tuple[torch.Tensor, torch.Tensor] | None]:
    names = spec.proj_names
    for path, t in copies.items():
        for name, copy in t.items():
            ref = model_level.get(name)
            if ref is None:
                raise InvalidAdapter(
                    f"per-layer copy {KEY_PREFIX + path + '.' + name!r} present but the model-level "
                    f"{MODEL_PREFIX + name!r} is missing"
                )
            if copy.shape != ref.shape or not torch.equal(copy, ref):
                # PEFT loads every copy into the same shared buffer: which one wins is load order.
                raise InvalidAdapter(
                    f"per-layer copy {KEY_PREFIX + path + '.' + name!r} differs from "
                    f"{MODEL_PREFIX + name!r}; the adapter's projections are ambiguous"
                )
    if model_level:
        for name, shape in zip(names, family.shapes()):
            if name not in model_level:
                raise InvalidAdapter(
                    f"{MODEL_PREFIX + names[0]!r} and {MODEL_PREFIX + names[1]!r} must both be "
                    f"present or both absent; {MODEL_PREFIX + name!r} is missing"
                )
            if tuple(model_level[name].shape) != shape:
                raise InvalidAdapter(
                    f"tensor {MODEL_PREFIX + name!r} has shape {list(model_level[name].shape)}, "
                    f"expected {list(shape)} (r and max (out, in) of the adapted layers)"
                )
        A, B = model_level[names[0]], model_level[names[1]]
        gA, gB = shared_projections(family)
        if torch.equal(A, gA) and torch.equal(B, gB):
            family_out, proj = family, None  # the seed reproduces them: store the seed only
        else:
            family_out = replace(family, stored_digest=projection_digest(A, B))
            proj = (A.contiguous(), B.contiguous())
    else:
        if save_projection and CANONICAL_META_KEY not in metadata:
            # PEFT raises for VeRA; RandLoRA silently regenerates. Either way the uploader expected
            # projections that are not there, so we refuse rather than guess.
            peft = "PEFT refuses to load this too" if spec.kind == "vera" else "set save_projection=false if intended"
            raise InvalidAdapter(
                f"{spec.label} config has save_projection=true but {MODEL_PREFIX + names[0]!r} / "
                f"{MODEL_PREFIX + names[1]!r} are missing ({peft})"
            )
        family_out, proj = family, None
    marker = metadata.get(CANONICAL_META_KEY)
    if marker is not None and marker != family_out.key():
        raise InvalidAdapter(
            f"safetensors metadata names projection family {marker!r}, the adapter gives {family_out.key()!r}"
        )
    return family_out, proj


def parse_projected(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base: BaseModelSpec,
    metadata: Mapping[str, str],
    spec: ProjectedKind,
) -> ParsedAdapter:
    r, seed, save_projection = _config(cfg, base, spec)
    targets = parse_targets(cfg, base)
    rest, model_level = _split(tensors, spec)
    names = spec.proj_names
    groups = group_by_module(rest, spec.vectors + names)
    copies: dict[str, dict[str, torch.Tensor]] = {}
    layer_t: dict[str, tuple[TargetLayer, dict[str, torch.Tensor]]] = {}
    for path, t in groups.items():
        own = {n: t.pop(n) for n in names if n in t}
        if own:
            copies[path] = own
        layer = base_layer(base, path)
        key = KEY_PREFIX + path + "."
        for name in spec.vectors:
            if name not in t:
                raise InvalidAdapter(f"module {path!r}: missing tensor {key + name!r}")
        layer_t[path] = (layer, t)
    if not layer_t:
        raise InvalidAdapter(f"adapter_model.safetensors contains no {spec.label} layers")

    targets.check_file(layer_t, base)
    dims = (max(lt[0].out_features for lt in layer_t.values()), max(lt[0].in_features for lt in layer_t.values()))
    _check_coverage(targets, base, set(layer_t), dims, spec.label)
    family = spec.family(cfg, r, seed, dims)
    layers = {path: spec.layer(path, layer, t, family) for path, (layer, t) in sorted(layer_t.items())}
    family, proj = _projections(spec, family, model_level, copies, save_projection, metadata)
    return ParsedAdapter(
        kind=spec.kind, layers=layers, target_modules=short_names(layers), family=family, projections=proj
    )
