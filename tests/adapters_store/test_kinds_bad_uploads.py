"""Every rejected upload maps to the right AdapterError subclass / status and names the problem."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from adapters_store import (
    AdapterTooLarge,
    InvalidAdapter,
    MalformedUpload,
    UnsupportedAdapter,
    parse_adapter,
)

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"  # [64, 64]
K = "model.layers.0.self_attn.k_proj"  # [32, 64]


def good_config(**over) -> dict:
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "bias": "none",
        "target_modules": ["q_proj", "k_proj"],
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
    }
    cfg.update(over)
    return cfg


def good_tensors(r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{P}{Q}.lora_A.weight": torch.randn(r, 64, generator=g),
        f"{P}{Q}.lora_B.weight": torch.randn(64, r, generator=g),
        f"{P}{K}.lora_A.weight": torch.randn(r, 64, generator=g),
        f"{P}{K}.lora_B.weight": torch.randn(32, r, generator=g),
    }


def test_good_baseline_parses(base_spec):
    parsed = parse_adapter(json.dumps(good_config()).encode(), st_save(good_tensors()), base_spec)
    assert set(parsed.layers) == {Q, K} and parsed.kind == "lora" and parsed.target_modules == ["k_proj", "q_proj"]
    f = parsed.layers[Q]
    assert torch.equal(f.B, good_tensors()[f"{P}{Q}.lora_B.weight"]) and f.scale == 2.0  # alpha/r kept beside B


def _with(**kw):
    """Mutate the good upload: cfg=dict of config overrides, t=callable(tensors)->tensors, raw_*=bytes."""

    def build():
        cfg = good_config(**kw.get("cfg", {}))
        tensors = good_tensors()
        if "t" in kw:
            tensors = kw["t"](tensors)
        cfg_b = kw.get("raw_cfg", json.dumps(cfg).encode())
        w_b = kw.get("raw_w") if "raw_w" in kw else st_save(tensors)
        return cfg_b, w_b

    return build


def _set(key, value):
    def f(t):
        t = dict(t)
        if value is None:
            del t[key]
        else:
            t[key] = value
        return t

    return f


def _drop_all(t):
    return {}


CASES = [
    # id, builder, error class, status, substring expected in the message
    ("bad-json", _with(raw_cfg=b"{not json"), MalformedUpload, 400, "not valid JSON"),
    ("json-not-object", _with(raw_cfg=b"[1, 2]"), MalformedUpload, 400, "JSON object"),
    ("json-bad-utf8", _with(raw_cfg=b"\xff\xfe\xfa"), MalformedUpload, 400, "not valid JSON"),
    ("config-too-large", _with(raw_cfg=b" " * (2 << 20) + b"{}"), AdapterTooLarge, 413, "adapter_config.json"),
    ("missing-peft-type", _with(cfg={"peft_type": None}), InvalidAdapter, 422, "peft_type"),
    # VeRA / RandLoRA are parsed now (test_projection_bad_uploads.py); LoRA tensors under them are rejected.
    (
        "vera-with-lora-tensors",
        _with(cfg={"peft_type": "VERA", "save_projection": False}),
        InvalidAdapter,
        422,
        "lora_A.weight",
    ),
    (
        "randlora-with-lora-tensors",
        _with(cfg={"peft_type": "RANDLORA", "save_projection": False}),
        InvalidAdapter,
        422,
        "lora_A.weight",
    ),
    ("ia3-unsupported", _with(cfg={"peft_type": "IA3"}), UnsupportedAdapter, 422, "IA3"),
    ("pickle-weights", _with(raw_w=pickle.dumps({"a": 1})), MalformedUpload, 400, "safetensors"),
    (
        "garbage-weights",
        _with(raw_w=b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 12345678}'),
        MalformedUpload,
        400,
        "safetensors",
    ),
    ("empty-weights", _with(raw_w=b""), MalformedUpload, 400, "safetensors"),
    ("dora-plus-lora-bias", _with(cfg={"use_dora": True, "lora_bias": True}), UnsupportedAdapter, 422, "lora_bias"),
    ("bias-all", _with(cfg={"bias": "all"}), UnsupportedAdapter, 422, "'bias'"),
    ("bias-lora-only", _with(cfg={"bias": "lora_only"}), UnsupportedAdapter, 422, "'bias'"),
    ("modules-to-save", _with(cfg={"modules_to_save": ["lm_head"]}), UnsupportedAdapter, 422, "modules_to_save"),
    (
        "trainable-tokens",
        _with(cfg={"trainable_token_indices": [1, 2]}),
        UnsupportedAdapter,
        422,
        "trainable_token_indices",
    ),
    ("arrow", _with(cfg={"arrow_config": {"top_k": 2}}), UnsupportedAdapter, 422, "arrow_config"),
    ("bdlora", _with(cfg={"use_bdlora": {"x": 1}}), UnsupportedAdapter, 422, "use_bdlora"),
    ("alora", _with(cfg={"alora_invocation_tokens": [5, 6]}), UnsupportedAdapter, 422, "alora_invocation_tokens"),
    ("velora", _with(cfg={"velora_config": {}}), UnsupportedAdapter, 422, "velora_config"),
    ("monteclora", _with(cfg={"monteclora_config": {}}), UnsupportedAdapter, 422, "monteclora_config"),
    ("kasa", _with(cfg={"kasa_config": {}}), UnsupportedAdapter, 422, "kasa_config"),
    ("mica", _with(cfg={"init_lora_weights": "mica"}), UnsupportedAdapter, 422, "mica"),
    ("pissa", _with(cfg={"init_lora_weights": "pissa_niter_4"}), UnsupportedAdapter, 422, "pissa_niter_4"),
    ("olora", _with(cfg={"init_lora_weights": "olora"}), UnsupportedAdapter, 422, "olora"),
    ("corda", _with(cfg={"init_lora_weights": "corda"}), UnsupportedAdapter, 422, "corda"),
    ("lora-ga", _with(cfg={"init_lora_weights": "lora_ga"}), UnsupportedAdapter, 422, "lora_ga"),
    ("layer-replication", _with(cfg={"layer_replication": [[0, 2]]}), UnsupportedAdapter, 422, "layer_replication"),
    ("target-parameters", _with(cfg={"target_parameters": ["x.weight"]}), UnsupportedAdapter, 422, "target_parameters"),
    ("qalora", _with(cfg={"use_qalora": True}), UnsupportedAdapter, 422, "use_qalora"),
    ("unsafe-regex", _with(cfg={"rank_pattern": {"(a+)+": 4}}), UnsupportedAdapter, 422, "(a+)+"),
    (
        "unknown-module",
        _with(t=_set(f"{P}model.layers.9.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64))),
        InvalidAdapter,
        422,
        "model.layers.9.self_attn.q_proj",
    ),
    (
        "non-adaptable-module",
        _with(
            t=lambda t: {
                **t,
                f"{P}model.embed_tokens.lora_A.weight": torch.zeros(4, 300),
                f"{P}model.embed_tokens.lora_B.weight": torch.zeros(64, 4),
            }
        ),
        InvalidAdapter,
        422,
        "model.embed_tokens",
    ),
    (
        "A-wrong-in",
        _with(t=_set(f"{P}{Q}.lora_A.weight", torch.zeros(4, 63))),
        InvalidAdapter,
        422,
        f"{Q}.lora_A.weight",
    ),
    (
        "B-wrong-out",
        _with(t=_set(f"{P}{K}.lora_B.weight", torch.zeros(64, 4))),
        InvalidAdapter,
        422,
        f"{K}.lora_B.weight",
    ),
    ("A-3d", _with(t=_set(f"{P}{Q}.lora_A.weight", torch.zeros(4, 64, 1))), InvalidAdapter, 422, "2-D"),
    ("A-without-B", _with(t=_set(f"{P}{Q}.lora_B.weight", None)), InvalidAdapter, 422, f"{Q}.lora_B.weight"),
    ("B-without-A", _with(t=_set(f"{P}{K}.lora_A.weight", None)), InvalidAdapter, 422, f"{K}.lora_A.weight"),
    ("unexpected-key", _with(t=_set(f"{P}{Q}.lora_C.weight", torch.zeros(3))), InvalidAdapter, 422, "lora_C"),
    (
        "unexpected-prefix",
        _with(t=_set("model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64))),
        InvalidAdapter,
        422,
        "expected prefix",
    ),
    (
        "adapter-name-in-key",
        _with(t=_set(f"{P}{Q}.lora_A.default.weight", torch.zeros(4, 64))),
        InvalidAdapter,
        422,
        "lora_A.default.weight",
    ),
    (
        "base-bias-key",
        _with(t=_set(f"{P}{Q}.base_layer.bias", torch.zeros(64))),
        InvalidAdapter,
        422,
        "base_layer.bias",
    ),
    (
        "bias-without-flag",
        _with(t=_set(f"{P}{Q}.lora_B.bias", torch.zeros(64))),
        InvalidAdapter,
        422,
        "lora_bias=false",
    ),
    ("flag-without-bias", _with(cfg={"lora_bias": True}), InvalidAdapter, 422, "lora_B.bias"),
    (
        "magnitude-without-dora",
        _with(t=_set(f"{P}{Q}.lora_magnitude_vector", torch.ones(64))),
        InvalidAdapter,
        422,
        "use_dora=false",
    ),
    ("dora-without-magnitude", _with(cfg={"use_dora": True}), InvalidAdapter, 422, "lora_magnitude_vector"),
    (
        "int-dtype",
        _with(t=_set(f"{P}{Q}.lora_A.weight", torch.zeros(4, 64, dtype=torch.int32))),
        InvalidAdapter,
        422,
        "dtype",
    ),
    (
        "nan",
        _with(t=_set(f"{P}{Q}.lora_A.weight", torch.full((4, 64), float("nan")))),
        InvalidAdapter,
        422,
        f"{Q}.lora_A.weight",
    ),
    (
        "inf",
        _with(t=_set(f"{P}{K}.lora_B.weight", torch.full((32, 4), float("inf")))),
        InvalidAdapter,
        422,
        "NaN or Inf",
    ),
    ("rank-mismatch-config", _with(cfg={"r": 8}), InvalidAdapter, 422, "does not match config r=8"),
    ("rank-pattern-mismatch", _with(cfg={"rank_pattern": {"k_proj": 2}}), InvalidAdapter, 422, "k_proj"),
    (
        "rank-zero",
        _with(
            t=lambda t: {**t, f"{P}{Q}.lora_A.weight": torch.zeros(0, 64), f"{P}{Q}.lora_B.weight": torch.zeros(64, 0)}
        ),
        InvalidAdapter,
        422,
        "rank 0",
    ),
    ("bad-r-type", _with(cfg={"r": True}), InvalidAdapter, 422, "'r'"),
    ("bad-alpha", _with(cfg={"lora_alpha": "eight"}), InvalidAdapter, 422, "lora_alpha"),
    ("empty-adapter", _with(t=_drop_all), InvalidAdapter, 422, "no LoRA layers"),
    (
        "adalora-dora",
        _with(cfg={"peft_type": "ADALORA", "init_r": 4, "use_dora": True}),
        UnsupportedAdapter,
        422,
        "use_dora",
    ),
    (
        "adalora-missing-E",
        _with(
            cfg={"peft_type": "ADALORA", "init_r": 4},
            t=lambda t: {f"{P}{Q}.lora_A": torch.zeros(4, 64), f"{P}{Q}.lora_B": torch.zeros(64, 4)},
        ),
        InvalidAdapter,
        422,
        f"{Q}.lora_E",
    ),
    (
        "adalora-E-shape",
        _with(
            cfg={"peft_type": "ADALORA", "init_r": 4},
            t=lambda t: {
                f"{P}{Q}.lora_A": torch.zeros(4, 64),
                f"{P}{Q}.lora_B": torch.zeros(64, 4),
                f"{P}{Q}.lora_E": torch.zeros(4),
            },
        ),
        InvalidAdapter,
        422,
        f"{Q}.lora_E",
    ),
    (
        "adalora-rank-exceeds-init-r",
        _with(
            cfg={"peft_type": "ADALORA", "init_r": 2},
            t=lambda t: {
                f"{P}{Q}.lora_A": torch.zeros(4, 64),
                f"{P}{Q}.lora_B": torch.zeros(64, 4),
                f"{P}{Q}.lora_E": torch.zeros(4, 1),
            },
        ),
        InvalidAdapter,
        422,
        "init_r=2",
    ),
    (
        "adalora-mask-mismatch",
        _with(
            cfg={"peft_type": "ADALORA", "init_r": 4, "rank_pattern": {f"{Q}.lora_E": [True, False, False, False]}},
            t=lambda t: {
                f"{P}{Q}.lora_A": torch.zeros(2, 64),
                f"{P}{Q}.lora_B": torch.zeros(64, 2),
                f"{P}{Q}.lora_E": torch.zeros(2, 1),
            },
        ),
        InvalidAdapter,
        422,
        "rank_pattern",
    ),
    (
        "adalora-all-rank-zero",
        _with(
            cfg={"peft_type": "ADALORA", "init_r": 2, "rank_pattern": {f"{Q}.lora_E": [False, False]}},
            t=lambda t: {
                f"{P}{Q}.lora_A": torch.zeros(0, 64),
                f"{P}{Q}.lora_B": torch.zeros(64, 0),
                f"{P}{Q}.lora_E": torch.zeros(0, 1),
            },
        ),
        InvalidAdapter,
        422,
        "rank > 0",
    ),
]


@pytest.mark.parametrize("case_id,build,err,status,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_upload_rejected(base_spec, case_id, build, err, status, needle):
    cfg_b, w_b = build()
    with pytest.raises(err) as info:
        parse_adapter(cfg_b, w_b, base_spec)
    assert info.value.status == status
    assert needle in str(info.value), f"message {str(info.value)!r} should mention {needle!r}"


def test_rank_above_server_max(base_model, spec_factory):
    spec = spec_factory(base_model, max_rank=2)
    with pytest.raises(UnsupportedAdapter) as info:
        parse_adapter(json.dumps(good_config()).encode(), st_save(good_tensors()), spec)
    assert info.value.status == 422 and "max_rank is 2" in str(info.value)


def test_total_bytes_above_server_max(base_model, spec_factory):
    w_b = st_save(good_tensors())
    tensor_bytes = sum(t.nbytes for t in good_tensors().values())
    spec = spec_factory(base_model, max_bytes=tensor_bytes - 1)
    with pytest.raises(AdapterTooLarge) as info:
        parse_adapter(json.dumps(good_config()).encode(), w_b, spec)
    assert info.value.status == 413 and str(tensor_bytes) in str(info.value)
    spec.max_bytes = tensor_bytes  # exactly at the limit is fine
    parse_adapter(json.dumps(good_config()).encode(), w_b, spec)


def test_peft_saved_conflicting_rank_pattern_is_rejected(base_spec):
    """PEFT saves configs with sorted keys, so a rank_pattern whose winner changes after sorting
    describes a file PEFT itself cannot load; we reject it rather than guess."""
    cfg = good_config(rank_pattern={"k_proj": 4, "layers.0.self_attn.k_proj": 2})  # k_proj wins on load
    t = good_tensors()
    t[f"{P}{K}.lora_A.weight"] = t[f"{P}{K}.lora_A.weight"][:2]
    t[f"{P}{K}.lora_B.weight"] = t[f"{P}{K}.lora_B.weight"][:, :2].contiguous()
    with pytest.raises(InvalidAdapter, match="rank_pattern\\['k_proj'\\]=4"):
        parse_adapter(json.dumps(cfg).encode(), st_save(t), base_spec)
