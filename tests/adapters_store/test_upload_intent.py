"""Uploads that cannot be what their author meant are refused with a 4xx naming the field / value;
genuine PEFT uploads (list, regex, all-linear, layers_to_transform, exclude_modules) still parse.

The CASES table holds uploads that used to be accepted (201) before these checks existed.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store import (
    AdapterStore,
    InvalidAdapter,
    InvalidAdapterId,
    LayerFactors,
    UnsupportedAdapter,
    parse_adapter,
    validate_adapter_id,
)
from adapters_store.delta_size import MAX_DELTA_RATIO, lora_delta_norm
from adapters_store.targets import compile_safe_regex, parse_targets
from tests.peft_helpers import save_peft_adapter

P = "base_model.model."
# Tiny Llama (conftest): hidden 64, intermediate 128, 2 layers, 2 KV heads -> q [64, 64], v [32, 64].
LAYERS = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
Q0, V0, Q1, V1 = LAYERS
R = 4


# ---------------------------------------------------------------------------------------------- builders
def lora_cfg(**over) -> dict:
    cfg = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": 8,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    cfg.update(over)
    return cfg


def lora_tensors(paths=LAYERS, dora: bool = False, bias: bool = False) -> dict[str, torch.Tensor]:
    """q/v factors of both layers, ~0.1 noise: ||ΔW|| is about 2x ||W0|| of the 0.02-std tiny model."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for path in paths:
        out = 64 if path.endswith("q_proj") else 32
        t[f"{P}{path}.lora_A.weight"] = 0.1 * torch.randn(R, 64, generator=g)
        t[f"{P}{path}.lora_B.weight"] = 0.1 * torch.randn(out, R, generator=g)
        if dora:
            t[f"{P}{path}.lora_magnitude_vector"] = torch.ones(out)
        if bias:
            t[f"{P}{path}.lora_B.bias"] = 0.1 * torch.randn(out, generator=g)
    return t


def adalora_tensors(a_scale: float = 0.1, e_scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    t = {}
    for path in LAYERS:
        out = 64 if path.endswith("q_proj") else 32
        t[f"{P}{path}.lora_A"] = a_scale * torch.randn(R, 64, generator=g)
        t[f"{P}{path}.lora_B"] = 0.1 * torch.randn(out, R, generator=g)
        t[f"{P}{path}.lora_E"] = e_scale * torch.randn(R, 1, generator=g)
    return t


def adalora_cfg(**over) -> dict:
    return {
        **lora_cfg(peft_type="ADALORA", init_r=R, target_r=2, total_step=10, lora_alpha=8, rank_pattern=None),
        **over,
    }


def projected(kind: str, **over) -> tuple[dict, dict[str, torch.Tensor]]:
    """A seed-only VeRA / RandLoRA upload of q/v in both layers (save_projection=false)."""
    g = torch.Generator().manual_seed(2)
    t = {}
    for path in LAYERS:
        out = 64 if path.endswith("q_proj") else 32
        if kind == "vera":
            t[f"{P}{path}.vera_lambda_d"] = torch.randn(R, generator=g)
            t[f"{P}{path}.vera_lambda_b"] = torch.randn(out, generator=g)
        else:  # nb = ceil(min(out, in) / r)
            nb = min(out, 64) // R
            t[f"{P}{path}.randlora_lambda"] = torch.randn(R, nb, generator=g)
            t[f"{P}{path}.randlora_gamma"] = torch.randn(nb, min(out, 64), generator=g)
    cfg = {
        "peft_type": kind.upper(),
        "r": R,
        "projection_prng_key": 0,
        "save_projection": False,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        **({"randlora_alpha": 8} if kind == "randlora" else {}),
        **over,
    }
    return cfg, t


def upload(cfg: dict, tensors: dict[str, torch.Tensor]):
    return lambda: (json.dumps(cfg).encode(), st_save(tensors))


def with_tensor(t: dict, key: str, value: torch.Tensor) -> dict:
    return {**t, key: value}


def without(t: dict, *paths: str) -> dict:
    return {k: v for k, v in t.items() if not any(k.startswith(P + p + ".") for p in paths)}


# ---------------------------------------------------------------------------------------------- bad uploads
CASES = [
    # id, upload, error, needle in the message
    # 1. target_modules naming layers this server cannot adapt, or with no tensors, or missing file layers
    (
        "target-embed-tokens",
        upload(lora_cfg(target_modules=["embed_tokens"]), lora_tensors()),
        UnsupportedAdapter,
        "'embed_tokens'",
    ),
    (
        "target-lm-head-plus-qv",
        upload(lora_cfg(target_modules=["lm_head", "q_proj", "v_proj"]), lora_tensors()),
        UnsupportedAdapter,
        "'lm_head'",
    ),
    (
        "target-self-attn-module",
        upload(lora_cfg(target_modules=["self_attn", "q_proj", "v_proj"]), lora_tensors()),
        UnsupportedAdapter,
        "'self_attn'",
    ),
    (
        "target-entry-without-tensors",
        upload(lora_cfg(target_modules=["q_proj", "k_proj", "v_proj"]), lora_tensors()),
        InvalidAdapter,
        "'k_proj' selects no layer",
    ),
    (
        "file-layer-not-targeted",
        upload(lora_cfg(target_modules=["q_proj"]), lora_tensors()),
        InvalidAdapter,
        f"{V0!r} has tensors",
    ),
    (
        "full-path-target-misses-layer",
        upload(lora_cfg(target_modules=[Q0, V0, "model.layers.1.self_attn.v_proj"]), lora_tensors()),
        InvalidAdapter,
        f"{Q1!r} has tensors",
    ),
    ("target-empty-list", upload(lora_cfg(target_modules=[]), lora_tensors()), InvalidAdapter, "empty list"),
    (
        "target-wrong-type",
        upload(lora_cfg(target_modules={"q_proj": 1}), lora_tensors()),
        InvalidAdapter,
        "'target_modules'",
    ),
    (
        "target-list-of-int",
        upload(lora_cfg(target_modules=["q_proj", 3]), lora_tensors()),
        InvalidAdapter,
        "'target_modules'",
    ),
    (
        "target-regex-misses-file-layer",
        upload(lora_cfg(target_modules=r".*\.q_proj"), lora_tensors()),
        InvalidAdapter,
        r"regex '.*\\.q_proj' does not fullmatch it",
    ),
    (
        "target-regex-unsafe",
        upload(lora_cfg(target_modules=r"(.*_proj)+"), lora_tensors()),
        UnsupportedAdapter,
        "(.*_proj)+",
    ),
    (
        "target-regex-backref",
        upload(lora_cfg(target_modules=r"(.)\1.*"), lora_tensors()),
        UnsupportedAdapter,
        "backreferences",
    ),
    (
        "target-regex-too-many-ways",
        upload(lora_cfg(target_modules=r"(.*.*.*)(.*.*.*)x"), lora_tensors()),
        UnsupportedAdapter,
        "(.*.*.*)(.*.*.*)x",
    ),
    (
        "target-regex-too-long",
        upload(lora_cfg(target_modules="a" * 300), lora_tensors()),
        UnsupportedAdapter,
        "300 characters",
    ),
    (
        "target-regex-invalid",
        upload(lora_cfg(target_modules="(q_proj"), lora_tensors()),
        InvalidAdapter,
        "not a valid regex",
    ),
    (
        "exclude-list-excludes-file-layer",
        upload(lora_cfg(exclude_modules=[V0]), lora_tensors()),
        InvalidAdapter,
        f"exclude_modules ['{V0}'] excludes it",
    ),
    (
        "exclude-short-name",
        upload(lora_cfg(exclude_modules=["v_proj"]), lora_tensors()),
        InvalidAdapter,
        "exclude_modules",
    ),
    (
        "exclude-regex",
        upload(lora_cfg(exclude_modules=r".*layers\.1\..*"), lora_tensors()),
        InvalidAdapter,
        f"{Q1!r} has tensors",
    ),
    (
        "exclude-all-linear",
        upload(lora_cfg(target_modules="all-linear", exclude_modules=["q_proj"]), lora_tensors()),
        InvalidAdapter,
        "exclude_modules",
    ),
    ("exclude-wrong-type", upload(lora_cfg(exclude_modules=7), lora_tensors()), InvalidAdapter, "'exclude_modules'"),
    # 2. layers_to_transform / layers_pattern
    (
        "layers-to-transform-999",
        upload(lora_cfg(layers_to_transform=[999]), lora_tensors()),
        InvalidAdapter,
        "names layers [999]",
    ),
    (
        "layers-to-transform-int-999",
        upload(lora_cfg(layers_to_transform=999), lora_tensors()),
        InvalidAdapter,
        "names layers [999]",
    ),
    (
        "layers-to-transform-negative",
        upload(lora_cfg(layers_to_transform=[0, -1]), lora_tensors()),
        InvalidAdapter,
        "names layers [-1]",
    ),
    (
        "file-layer-outside-layers-to-transform",
        upload(lora_cfg(layers_to_transform=[0]), lora_tensors()),
        InvalidAdapter,
        "layer index 1 is not in layers_to_transform [0]",
    ),
    (
        "layers-to-transform-wrong-type",
        upload(lora_cfg(layers_to_transform=["0"]), lora_tensors()),
        InvalidAdapter,
        "'layers_to_transform'",
    ),
    (
        "layers-to-transform-bool",
        upload(lora_cfg(layers_to_transform=True), lora_tensors()),
        InvalidAdapter,
        "'layers_to_transform'",
    ),
    (
        "layers-pattern-int",
        upload(lora_cfg(layers_to_transform=[0, 1], layers_pattern=5), lora_tensors()),
        InvalidAdapter,
        "'layers_pattern'",
    ),
    (
        "layers-pattern-list-with-int",
        upload(lora_cfg(layers_to_transform=[0, 1], layers_pattern=["layers", 3]), lora_tensors()),
        InvalidAdapter,
        "'layers_pattern'",
    ),
    (
        "layers-pattern-matches-nothing",
        upload(lora_cfg(layers_to_transform=[0, 1], layers_pattern="blocks"), lora_tensors()),
        InvalidAdapter,
        "'blocks' matches no layer",
    ),
    (
        "layers-pattern-alone",
        upload(lora_cfg(layers_pattern="layers"), lora_tensors()),
        InvalidAdapter,
        "needs layers_to_transform",
    ),
    (
        "layers-pattern-empty-entry",
        upload(lora_cfg(layers_to_transform=[0, 1], layers_pattern=[""]), lora_tensors()),
        InvalidAdapter,
        "[''] matches no layer",
    ),
    (
        "layers-pattern-unsafe",
        upload(lora_cfg(layers_to_transform=[0, 1], layers_pattern="(l+)+ayers"), lora_tensors()),
        UnsupportedAdapter,
        "layers_pattern",
    ),
    (
        "regex-target-with-layers",
        upload(lora_cfg(target_modules=r".*\.(q|v)_proj", layers_to_transform=[0, 1]), lora_tensors()),
        InvalidAdapter,
        "'layers_to_transform'=[0, 1] cannot",
    ),
    # 3. alphas and update size
    ("lora-alpha-zero", upload(lora_cfg(lora_alpha=0), lora_tensors()), InvalidAdapter, "'lora_alpha' must be > 0"),
    ("lora-alpha-negative", upload(lora_cfg(lora_alpha=-8), lora_tensors()), InvalidAdapter, "got -8"),
    ("lora-alpha-1e30", upload(lora_cfg(lora_alpha=1e30), lora_tensors()), InvalidAdapter, "lora_alpha=1e+30"),
    (
        "lora-alpha-overflows-float32",
        upload(lora_cfg(lora_alpha=1e40), lora_tensors()),
        InvalidAdapter,
        "overflows float32",
    ),
    (
        "rslora-alpha-1e30",
        upload(lora_cfg(lora_alpha=1e30, use_rslora=True), lora_tensors()),
        InvalidAdapter,
        "lora_alpha=1e+30 / sqrt(r)",
    ),
    (
        "alpha-pattern-zero",
        upload(lora_cfg(alpha_pattern={"v_proj": 0}), lora_tensors()),
        InvalidAdapter,
        "alpha_pattern['v_proj'] must be > 0",
    ),
    (
        "alpha-pattern-negative",
        upload(lora_cfg(alpha_pattern={"q_proj": -2.5}), lora_tensors()),
        InvalidAdapter,
        "alpha_pattern['q_proj']",
    ),
    (
        "alpha-pattern-1e30",
        upload(lora_cfg(alpha_pattern={"v_proj": 1e30}), lora_tensors()),
        InvalidAdapter,
        "alpha_pattern['v_proj']=1e+30",
    ),
    (
        "dora-alpha-1e30",
        upload(lora_cfg(use_dora=True, lora_alpha=1e30), lora_tensors(dora=True)),
        InvalidAdapter,
        "lora_alpha=1e+30",
    ),
    (
        "dora-huge-magnitude",
        upload(
            lora_cfg(use_dora=True),
            with_tensor(lora_tensors(dora=True), f"{P}{Q0}.lora_magnitude_vector", torch.full((64,), 1e30)),
        ),
        InvalidAdapter,
        "lora_magnitude_vector has norm",
    ),
    (
        "lora-bias-overflows-float32",
        upload(
            lora_cfg(lora_bias=True, lora_alpha=4e8),
            with_tensor(lora_tensors(bias=True), f"{P}{Q0}.lora_B.bias", torch.full((64,), 1e32)),
        ),
        InvalidAdapter,
        "lora_B.bias",
    ),
    (
        "huge-B",
        upload(lora_cfg(), with_tensor(lora_tensors(), f"{P}{V1}.lora_B.weight", torch.full((32, R), 1e6))),
        InvalidAdapter,
        f"{V1!r}: the update",
    ),
    (
        "adalora-alpha-negative",
        upload(adalora_cfg(lora_alpha=-1), adalora_tensors()),
        InvalidAdapter,
        "'lora_alpha' must be >= 0",
    ),
    ("adalora-alpha-1e30", upload(adalora_cfg(lora_alpha=1e30), adalora_tensors()), InvalidAdapter, "lora_alpha=1e+30"),
    (
        "adalora-A-times-E-overflows",
        upload(adalora_cfg(), adalora_tensors(a_scale=1e20, e_scale=1e20)),
        InvalidAdapter,
        "lora_A * lora_E overflows float32",
    ),
    (
        "adalora-lm-head",
        upload(adalora_cfg(target_modules=["lm_head", "q_proj", "v_proj"]), adalora_tensors()),
        UnsupportedAdapter,
        "'lm_head'",
    ),
    ("adalora-layers-999", upload(adalora_cfg(layers_to_transform=[999]), adalora_tensors()), InvalidAdapter, "[999]"),
    ("randlora-alpha-zero", upload(*projected("randlora", randlora_alpha=0)), InvalidAdapter, "'randlora_alpha'"),
    (
        "randlora-alpha-negative",
        upload(*projected("randlora", randlora_alpha=-16)),
        InvalidAdapter,
        "'randlora_alpha' must be > 0",
    ),
    ("randlora-layers-999", upload(*projected("randlora", layers_to_transform=[999])), InvalidAdapter, "[999]"),
    (
        "randlora-embed-tokens",
        upload(*projected("randlora", target_modules=["embed_tokens"])),
        UnsupportedAdapter,
        "'embed_tokens'",
    ),
    (
        "vera-lm-head",
        upload(*projected("vera", target_modules=["lm_head", "q_proj", "v_proj"])),
        UnsupportedAdapter,
        "'lm_head'",
    ),
    (
        "vera-file-layer-not-targeted",
        upload(*projected("vera", target_modules=["q_proj"])),
        InvalidAdapter,
        f"{V0!r} has tensors",
    ),
    (
        "vera-outside-layers-to-transform",
        upload(*projected("vera", layers_to_transform=1)),
        InvalidAdapter,
        "layers_to_transform [1]",
    ),
]


@pytest.mark.parametrize("case_id,build,err,needle", CASES, ids=[c[0] for c in CASES])
def test_unintended_upload_rejected(base_spec, case_id, build, err, needle):
    cfg_b, w_b = build()
    with pytest.raises(err) as info:
        parse_adapter(cfg_b, w_b, base_spec)
    assert info.value.status == 422
    assert needle in str(info.value), f"message {str(info.value)!r} should mention {needle!r}"


@pytest.mark.parametrize("adapter_id", ["CURRENT", "current", "Current", "manifest.json", "META.JSON"])
def test_reserved_adapter_id_rejected(adapter_id):
    with pytest.raises(InvalidAdapterId) as info:
        validate_adapter_id(adapter_id)
    assert info.value.status == 400 and "reserved" in str(info.value) and repr(adapter_id) in str(info.value)


def test_reserved_id_cannot_be_published_and_old_dirs_are_left_alone(tmp_path):
    (tmp_path / "current").mkdir()  # e.g. published before ids were reserved: scan must not crash on it
    store = AdapterStore(tmp_path)
    with pytest.raises(InvalidAdapterId):
        store.publish("CURRENT", {"a.json": b"{}"}, {})
    assert store.scan() == {} and (tmp_path / "current").is_dir()
    assert validate_adapter_id("CURRENTLY") == "CURRENTLY"  # only the exact names are reserved


# ---------------------------------------------------------------------------------------------- good uploads
def test_hand_built_baselines_parse(base_spec):
    """The table's cases fail for the reason they name, not because their baseline is broken."""
    for build in (
        upload(lora_cfg(), lora_tensors()),
        upload(lora_cfg(use_dora=True), lora_tensors(dora=True)),
        upload(lora_cfg(lora_bias=True), lora_tensors(bias=True)),
        upload(adalora_cfg(), adalora_tensors()),
        upload(adalora_cfg(lora_alpha=0), adalora_tensors()),
        upload(*projected("vera")),
        upload(*projected("randlora")),
    ):
        assert set(parse_adapter(*build(), base_spec).layers) == set(LAYERS)


@pytest.mark.parametrize(
    "over,paths",
    [
        ({"target_modules": None}, LAYERS),  # missing: PEFT's default table, accept the file
        ({"target_modules": "all-linear"}, LAYERS),
        ({"target_modules": "ALL-LINEAR"}, LAYERS),
        ({"target_modules": r".*\.(q_proj|v_proj)"}, LAYERS),
        ({"target_modules": ["self_attn.q_proj", "v_proj", "v_proj"]}, LAYERS),
        ({"target_modules": LAYERS}, LAYERS),  # full paths, as PEFT saves all-linear
        ({"layers_to_transform": 1}, [Q1, V1]),
        ({"layers_to_transform": [1], "layers_pattern": "layers"}, [Q1, V1]),
        ({"layers_to_transform": [0, 1], "layers_pattern": ["h", "layers"]}, LAYERS),
        ({"layers_to_transform": []}, LAYERS),  # PEFT: empty list = unused
        ({"layers_to_transform": [0], "layers_pattern": ""}, [Q0, V0]),  # PEFT: "" = its default index regex
        ({"exclude_modules": [V0]}, [Q0, Q1, V1]),
        ({"exclude_modules": r".*\.0\.self_attn\.v_proj"}, [Q0, Q1, V1]),
        ({"exclude_modules": ["k_proj", "lm_head"]}, LAYERS),
        ({"target_modules": ["q_proj", "k_proj", "v_proj"], "exclude_modules": ["k_proj"]}, LAYERS),  # k: a no-op
        ({"layers_to_transform": [1], "target_modules": [Q0, "v_proj"]}, [Q0, V1]),  # an exact path bypasses the filter
    ],
)
def test_hand_built_selection_accepted(base_spec, over, paths):
    parsed = parse_adapter(*upload(lora_cfg(**over), lora_tensors(paths))(), base_spec)
    assert sorted(parsed.layers) == sorted(paths)


def test_alpha_just_under_the_ratio_is_accepted(base_spec):
    """The size limit is MAX_DELTA_RATIO x ||W0||_F per layer, exactly."""
    t = lora_tensors([Q0])
    f = LayerFactors(A=t[f"{P}{Q0}.lora_A.weight"], B=t[f"{P}{Q0}.lora_B.weight"], scale=1.0)
    limit_alpha = MAX_DELTA_RATIO * base_spec.weight_norm(Q0) / lora_delta_norm(f) * R  # scale = alpha / r
    ok = lora_cfg(target_modules=["q_proj"], lora_alpha=0.99 * limit_alpha)
    parse_adapter(*upload(ok, t)(), base_spec)
    with pytest.raises(InvalidAdapter, match="more than 1000x"):
        parse_adapter(*upload({**ok, "lora_alpha": 1.01 * limit_alpha}, t)(), base_spec)


def test_gram_norm_is_the_dense_norm():
    g = torch.Generator().manual_seed(3)
    f = LayerFactors(A=torch.randn(5, 40, generator=g), B=torch.randn(24, 5, generator=g), scale=3.5, divisor=2.0)
    dense = torch.linalg.norm((f.B.double() @ f.A.double()) * f.scale / f.divisor).item()
    assert lora_delta_norm(f) == pytest.approx(dense, rel=1e-12)


PEFT_CONFIGS = {
    "lora-list": ("lora", dict(target_modules=["q_proj", "v_proj"])),
    "lora-regex": ("lora", dict(target_modules=r".*\.(q_proj|down_proj)")),
    "lora-all-linear": ("lora", dict(target_modules="all-linear")),
    "lora-default-targets": ("lora", dict()),
    "lora-layers": ("lora", dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[1])),
    "lora-layers-pattern": ("lora", dict(target_modules=["o_proj"], layers_to_transform=0, layers_pattern="layers")),
    "lora-exclude": ("lora", dict(target_modules=["q_proj", "v_proj"], exclude_modules=[V0])),
    "lora-exclude-regex": ("lora", dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*")),
    "lora-all-linear-exclude": ("lora", dict(target_modules="all-linear", exclude_modules=["v_proj", "up_proj"])),
    "dora-full-paths": ("lora", dict(target_modules=["model.layers.0.self_attn.q_proj", "gate_proj"], use_dora=True)),
    "adalora-layers": ("adalora", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0])),
    "vera-regex": ("vera", dict(target_modules=r".*\.(q_proj|k_proj)")),
    "randlora-layers": ("randlora", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
}


def _peft_config(kind: str, kw: dict):
    from peft import AdaLoraConfig, LoraConfig, RandLoraConfig, VeraConfig

    if kind == "lora":
        return LoraConfig(r=4, lora_alpha=8, **kw)
    if kind == "adalora":
        return AdaLoraConfig(init_r=4, target_r=2, total_step=10, **kw)
    if kind == "vera":
        return VeraConfig(r=8, **kw)
    return RandLoraConfig(r=4, randlora_alpha=8, **kw)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_real_peft_uploads_accepted(base_model, base_spec, tmp_path, name):
    """Saved by PEFT itself: accepted, with exactly the layers PEFT created; a literal "all-linear" or a
    missing target_modules in the saved config is accepted too."""
    kind, kw = PEFT_CONFIGS[name]
    cfg_b, w_b = save_peft_adapter(base_model, _peft_config(kind, kw), tmp_path, seed=7, scale=0.1)
    created = {k[len(P) :].rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in st_load(w_b) if k.startswith(P)}
    created = {p for p in created if p in base_spec.layers}
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    assert set(parsed.layers) == created and created
    saved = json.loads(cfg_b)
    literal = [None] + (["all-linear"] if kw.get("target_modules") == "all-linear" else [])
    for tm in literal if "layers_to_transform" not in kw else []:
        cfg_b = json.dumps({**saved, "target_modules": tm}).encode()
        assert set(parse_adapter(cfg_b, w_b, base_spec).layers) == created


SELECTION_CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "model.layers.1.mlp.up_proj"]),
    dict(target_modules=r".*\.(q_proj|down_proj)"),
    dict(target_modules=r"model\.layers\.\d+\.mlp\.(gate|up)_proj"),
    dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
    dict(target_modules=["o_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["o_proj", "q_proj"], layers_to_transform=[1], layers_pattern=["h", "model.layers"]),
    dict(target_modules=["o_proj", "model.layers.1.self_attn.q_proj"], layers_to_transform=[0]),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
    dict(target_modules=["q_proj", "gate_proj"], exclude_modules=r".*layers\.1\..*"),
]


@pytest.mark.parametrize("kw", SELECTION_CONFIGS, ids=[str(i) for i in range(len(SELECTION_CONFIGS))])
def test_selection_matches_peft(base_spec, kw):
    """Targets.selects is PEFT's check_target_module_exists on every adaptable layer."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    ours = parse_targets(lora_cfg(**kw), base_spec)
    peft_cfg = LoraConfig(r=4, **kw)
    for path in base_spec.layers:
        assert ours.selects(path) == bool(check_target_module_exists(peft_cfg, path)), path


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.(q_proj|v_proj)",
        r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
        r"model\.layers\.\d+\.self_attn\.[qkvo]_proj",
        r"(?i).*Q_PROJ",
        r".*layers\.(0|1|2|3|10|11)\..*",
        r"(?:model\.)?layers\.\d{1,3}\..*",
    ],
)
def test_real_world_regexes_are_safe(base_spec, pattern):
    assert compile_safe_regex("target_modules", pattern, base_spec).pattern == pattern


@pytest.mark.parametrize(
    "pattern", [r"(a+)+$", r"(a|aa)*b", r"(?=q).*", r"(?P<x>.)(?P=x)", r".*+q", r"(?>.*)q", r".*.*.*.*.*x"]
)
def test_dangerous_regexes_are_refused(base_spec, pattern):
    with pytest.raises(UnsupportedAdapter, match=re.escape(repr(pattern))):
        compile_safe_regex("target_modules", pattern, base_spec)
