"""Rejected VeRA / RandLoRA uploads: right AdapterError / status, message naming the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from adapters_store import (
    InvalidAdapter,
    ProjectionFamily,
    UnsupportedAdapter,
    generate_projections,
    parse_adapter,
)

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"  # [64, 64]
K = "model.layers.0.self_attn.k_proj"  # [32, 64]
R = 4
# Families of the good uploads below (layers q [64,64] and k [32,64] -> max (64, 64)).
VERA_FAM = ProjectionFamily("vera", 0, R, 64, 64, "dense", "float32")
RL_FAM = ProjectionFamily("randlora", 0, R, 64, 64, "dense", "bfloat16")


def vera_cfg(**over) -> dict:
    cfg = {
        "peft_type": "VERA",
        "r": R,
        "projection_prng_key": 0,
        "save_projection": True,
        "bias": "none",
        "target_modules": ["q_proj", "k_proj"],
        "modules_to_save": None,
        "fan_in_fan_out": False,
    }
    cfg.update(over)
    return cfg


def vera_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    A, B = generate_projections(VERA_FAM)
    return {
        f"{P}{Q}.vera_lambda_d": torch.randn(R, generator=g),
        f"{P}{Q}.vera_lambda_b": torch.randn(64, generator=g),
        f"{P}{K}.vera_lambda_d": torch.randn(R, generator=g),
        f"{P}{K}.vera_lambda_b": torch.randn(32, generator=g),
        "base_model.vera_A": A,
        "base_model.vera_B": B,
    }


def rl_cfg(**over) -> dict:
    cfg = {
        "peft_type": "RANDLORA",
        "r": R,
        "randlora_alpha": 8,
        "projection_prng_key": 0,
        "save_projection": True,
        "sparse": False,
        "very_sparse": False,
        "bias": "none",
        "target_modules": ["q_proj", "k_proj"],
    }
    cfg.update(over)
    return cfg


def rl_tensors() -> dict[str, torch.Tensor]:
    """q: min 64 -> nb 16; k: min 32 -> nb 8. Per-layer copies as PEFT writes them."""
    g = torch.Generator().manual_seed(1)
    A, B = generate_projections(RL_FAM)
    t = {"base_model.randlora_A": A, "base_model.randlora_B": B}
    for path, nb, min_l in ((Q, 16, 64), (K, 8, 32)):
        t[f"{P}{path}.randlora_lambda"] = torch.randn(R, nb, generator=g)
        t[f"{P}{path}.randlora_gamma"] = torch.randn(nb, min_l, generator=g)
        t[f"{P}{path}.randlora_A"] = A.clone()
        t[f"{P}{path}.randlora_B"] = B.clone()
    return t


def _set(t: dict, key: str, value) -> dict:
    t = dict(t)
    if value is None:
        t.pop(key)
    else:
        t[key] = value
    return t


def case(kind: str, cfg: dict | None = None, t=None):
    def build():
        c = (vera_cfg if kind == "vera" else rl_cfg)(**(cfg or {}))
        tensors = vera_tensors() if kind == "vera" else rl_tensors()
        return json.dumps(c).encode(), st_save(t(tensors) if t else tensors)

    return build


def _perturb_copy(t):
    bad = t[f"{P}{K}.randlora_B"].clone()
    bad[0, 0, 0] += 1.0
    return _set(t, f"{P}{K}.randlora_B", bad)


CASES = [
    (
        "vera-missing-lambda-d",
        case("vera", t=lambda t: _set(t, f"{P}{Q}.vera_lambda_d", None)),
        InvalidAdapter,
        f"{Q}.vera_lambda_d",
    ),
    (
        "vera-lambda-b-wrong-shape",
        case("vera", t=lambda t: _set(t, f"{P}{K}.vera_lambda_b", torch.ones(64))),
        InvalidAdapter,
        f"{K}.vera_lambda_b",
    ),
    ("vera-lambda-d-vs-config-r", case("vera", cfg={"r": 8}), InvalidAdapter, "expected [8] (config r=8)"),
    (
        "vera-nan",
        case("vera", t=lambda t: _set(t, f"{P}{Q}.vera_lambda_b", torch.full((64,), float("nan")))),
        InvalidAdapter,
        "NaN",
    ),
    (
        "vera-int-dtype",
        case("vera", t=lambda t: _set(t, f"{P}{Q}.vera_lambda_d", torch.ones(R, dtype=torch.int32))),
        InvalidAdapter,
        "dtype",
    ),
    (
        "vera-save-projection-without-projections",
        case("vera", t=lambda t: _set(_set(t, "base_model.vera_A", None), "base_model.vera_B", None)),
        InvalidAdapter,
        "save_projection=true",
    ),
    (
        "vera-only-A",
        case("vera", t=lambda t: _set(t, "base_model.vera_B", None)),
        InvalidAdapter,
        "'base_model.vera_B' is missing",
    ),
    (
        "vera-A-wrong-shape",
        case("vera", t=lambda t: _set(t, "base_model.vera_A", torch.zeros(R, 128))),
        InvalidAdapter,
        "'base_model.vera_A' has shape [4, 128]",
    ),
    (
        "vera-unknown-module",
        case("vera", t=lambda t: {**t, f"{P}model.layers.9.self_attn.q_proj.vera_lambda_d": torch.ones(R)}),
        InvalidAdapter,
        "model.layers.9.self_attn",
    ),
    (
        "vera-unexpected-key",
        case("vera", t=lambda t: _set(t, f"{P}{Q}.vera_lambda_c", torch.ones(3))),
        InvalidAdapter,
        "vera_lambda_c",
    ),
    (
        "vera-foreign-model-level",
        case("vera", t=lambda t: _set(t, "base_model.randlora_A", torch.ones(3))),
        InvalidAdapter,
        "base_model.randlora_A",
    ),
    ("vera-bias-vera-only", case("vera", cfg={"bias": "vera_only"}), UnsupportedAdapter, "'bias'"),
    ("vera-bias-all", case("vera", cfg={"bias": "all"}), UnsupportedAdapter, "'bias'"),
    ("vera-modules-to-save", case("vera", cfg={"modules_to_save": ["lm_head"]}), UnsupportedAdapter, "modules_to_save"),
    ("vera-bad-fifo", case("vera", cfg={"fan_in_fan_out": "yes"}), InvalidAdapter, "fan_in_fan_out"),
    ("vera-negative-seed", case("vera", cfg={"projection_prng_key": -1}), InvalidAdapter, "projection_prng_key"),
    ("vera-empty", case("vera", cfg={"save_projection": False}, t=lambda t: {}), InvalidAdapter, "no VeRA layers"),
    (
        "vera-config-targets-wider-layer",
        case("vera", cfg={"target_modules": ["q_proj", "k_proj", "gate_proj"]}),
        InvalidAdapter,
        "target_modules",
    ),
    (
        "vera-per-layer-copy-without-model-level",
        case(
            "vera",
            cfg={"save_projection": False},
            t=lambda t: _set(
                _set(_set(t, "base_model.vera_A", None), "base_model.vera_B", None), f"{P}{Q}.vera_A", torch.ones(R, 64)
            ),
        ),
        InvalidAdapter,
        "model-level",
    ),
    (
        "randlora-per-layer-copy-differs",
        case("randlora", t=_perturb_copy),
        InvalidAdapter,
        f"{K}.randlora_B' differs from 'base_model.randlora_B'",
    ),
    (
        "randlora-gamma-wrong-shape",
        case("randlora", t=lambda t: _set(t, f"{P}{K}.randlora_gamma", torch.ones(8, 64))),
        InvalidAdapter,
        f"{K}.randlora_gamma",
    ),
    (
        "randlora-lambda-wrong-nb",
        case("randlora", t=lambda t: _set(t, f"{P}{Q}.randlora_lambda", torch.ones(R, 8))),
        InvalidAdapter,
        f"{Q}.randlora_lambda",
    ),
    (
        "randlora-missing-gamma",
        case("randlora", t=lambda t: _set(t, f"{P}{Q}.randlora_gamma", None)),
        InvalidAdapter,
        f"{Q}.randlora_gamma",
    ),
    (
        "randlora-inf",
        case("randlora", t=lambda t: _set(t, f"{P}{Q}.randlora_gamma", torch.full((16, 64), float("inf")))),
        InvalidAdapter,
        "NaN or Inf",
    ),
    (
        "randlora-B-wrong-shape",
        case(
            "randlora",
            cfg={"save_projection": False},
            t=lambda t: (
                {
                    k: v
                    for k, v in t.items()
                    if "randlora_lambda" in k or "randlora_gamma" in k or k == "base_model.randlora_A"
                }
                | {"base_model.randlora_B": torch.zeros(64, 8, R)}
            ),
        ),
        InvalidAdapter,
        "'base_model.randlora_B' has shape",
    ),
    (
        "randlora-save-projection-without-projections",
        case("randlora", t=lambda t: {k: v for k, v in t.items() if "lambda" in k or "gamma" in k}),
        InvalidAdapter,
        "save_projection=true",
    ),
    ("randlora-bias", case("randlora", cfg={"bias": "randlora_only"}), UnsupportedAdapter, "'bias'"),
    ("randlora-bad-alpha", case("randlora", cfg={"randlora_alpha": "big"}), InvalidAdapter, "randlora_alpha"),
    ("randlora-bad-sparse", case("randlora", cfg={"sparse": 1}), InvalidAdapter, "sparse"),
    (
        "randlora-lora-keys",
        case("randlora", t=lambda t: _set(t, f"{P}{Q}.lora_A.weight", torch.ones(R, 64))),
        InvalidAdapter,
        "lora_A.weight",
    ),
]


@pytest.mark.parametrize("case_id,build,err,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_projected_upload_rejected(base_spec, case_id, build, err, needle):
    cfg_b, w_b = build()
    with pytest.raises(err) as info:
        parse_adapter(cfg_b, w_b, base_spec)
    assert info.value.status == 422
    assert needle in str(info.value), f"message {str(info.value)!r} should mention {needle!r}"


@pytest.mark.parametrize("kind", ["vera", "randlora"])
def test_good_baselines_parse(base_spec, kind):
    """The cases above fail for the reason they name, not because the baseline is broken."""
    cfg_b, w_b = case(kind)()
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    assert parsed.kind == kind and set(parsed.layers) == {Q, K} and parsed.projection == "seed"
    assert parsed.family == (VERA_FAM if kind == "vera" else RL_FAM)
    if kind == "randlora":
        assert parsed.layers[Q].scale == 2.0  # randlora_alpha / r


@pytest.mark.parametrize("kind", ["vera", "randlora"])
def test_rank_above_server_max(base_model, spec_factory, kind):
    cfg_b, w_b = case(kind)()
    with pytest.raises(UnsupportedAdapter) as info:
        parse_adapter(cfg_b, w_b, spec_factory(base_model, max_rank=R - 1))
    assert info.value.status == 422 and f"r={R}" in str(info.value) and "max_rank is 3" in str(info.value)
    parse_adapter(cfg_b, w_b, spec_factory(base_model, max_rank=R))  # at the limit is fine


def test_fan_in_fan_out_is_ignored_for_linear(base_spec):
    a = parse_adapter(*case("vera")(), base_spec)
    b = parse_adapter(*case("vera", cfg={"fan_in_fan_out": True})(), base_spec)
    for path in a.layers:
        assert torch.equal(a.delta_weight(path), b.delta_weight(path))


def test_very_sparse_wins_over_sparse(base_spec):
    cfg_b, w_b = case(
        "randlora",
        cfg={"sparse": True, "very_sparse": True, "save_projection": False},
        t=lambda t: {k: v for k, v in t.items() if "lambda" in k or "gamma" in k},
    )()
    assert parse_adapter(cfg_b, w_b, base_spec).family.sparsity == "very_sparse"
