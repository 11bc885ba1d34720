"""VeRA / RandLoRA parsed factors reproduce PEFT's numbers: ΔW, per-layer forward, merged logits,
and stored (tampered) projections."""

from __future__ import annotations

import copy
import hashlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store import (
    ParsedAdapter,
    RandLoraFactors,
    VeraFactors,
    parse_adapter,
    randlora_layer_bases,
    randlora_scaled_bases,
    vera_layer_bases,
)

PREFIX = "base_model.model."
NAMES = [
    "vera",
    "vera_noproj",
    "vera_all_r7",
    "randlora",
    "randlora_noproj",
    "randlora_sparse_all",
    "randlora_vsparse_noproj",
]


def peft_layers(loaded, kind: str):
    marker = "vera_lambda_d" if kind == "vera" else "randlora_lambda"
    return {
        n[len(PREFIX) :]: m
        for n, m in loaded.named_modules()
        if n.startswith(PREFIX) and hasattr(m, marker) and hasattr(m, "get_delta_weight")
    }


def layer_forward(parsed: ParsedAdapter, path: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter term of one layer, written from docs/adapters.md §3.3 / §4.3 with the public helpers."""
    A, B = parsed.resolve_projections()
    f = parsed.layers[path]
    if isinstance(f, VeraFactors):
        A_l, B_l = vera_layer_bases(A, B, f.lambda_b.shape[0], f.in_features)
        return f.lambda_b * F.linear(f.lambda_d * F.linear(x, A_l), B_l)
    assert isinstance(f, RandLoraFactors)
    A_l, B_l = randlora_layer_bases(A, B, f.out_features, f.in_features, f.rank)
    U, V = randlora_scaled_bases(f.lam, f.gamma, A_l, B_l)
    if f.in_features <= f.out_features:
        return ((x @ U.T) @ V.T) * f.scale
    return ((x @ V) @ U) * f.scale


def check_against_peft(parsed: ParsedAdapter, loaded, base_spec, seed: int) -> set[str]:
    """Asserts ΔW, merged W and the layer forward match PEFT; returns which of in<=out / in>out occurred."""
    mods = peft_layers(loaded, parsed.kind)
    assert set(mods) == set(parsed.layers) and mods
    g = torch.Generator().manual_seed(seed)
    cases = set()
    for path, mod in mods.items():
        ref = mod.get_delta_weight("default").detach()
        got = parsed.delta_weight(path)
        assert ref.abs().max() > 1e-2, f"{path}: adapter should matter"
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        w0 = base_spec.weight(path)
        torch.testing.assert_close(parsed.merged_weight(path, w0), w0 + ref, rtol=0, atol=1e-6)
        x = torch.randn(3, 5, w0.shape[1], generator=g)
        with torch.no_grad():
            ref_y = mod(x) - mod.get_base_layer()(x)
        torch.testing.assert_close(layer_forward(parsed, path, x), ref_y, rtol=0, atol=1e-5)
        cases.add("in<=out" if w0.shape[1] <= w0.shape[0] else "in>out")
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_delta_and_forward_match_peft(projected_adapters, base_spec, name):
    cfg_b, w_b, loaded = projected_adapters[name]
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    assert parsed.kind == name.split("_")[0] and parsed.projection == "seed"
    cases = check_against_peft(parsed, loaded, base_spec, seed=NAMES.index(name))
    if parsed.kind == "randlora":
        assert cases == {"in<=out", "in>out"}  # q/o/gate/up vs k/v/down
    assert parsed.rank == parsed.family.r
    assert parsed.nbytes == sum(f.nbytes for f in parsed.layers.values())  # seed projections are shared


def test_merged_logits_match_peft(projected_adapters, base_model, base_spec):
    """End to end: merging our ΔW into the base reproduces PEFT's unmerged logits."""
    ids = torch.tensor([[1, 5, 17, 42, 99, 250, 3, 7]])
    with torch.no_grad():
        base_logits = base_model(ids).logits
    for name in ["vera_all_r7", "randlora_sparse_all", "randlora"]:
        cfg_b, w_b, loaded = projected_adapters[name]
        parsed = parse_adapter(cfg_b, w_b, base_spec)
        merged = copy.deepcopy(base_model)
        with torch.no_grad():
            for path in parsed.layers:
                lin = merged.get_submodule(path)
                lin.weight.copy_(parsed.merged_weight(path, lin.weight))
            ours, ref = merged(ids).logits, loaded(ids).logits
        assert (ref - base_logits).abs().max() > 1e-2, f"{name}: adapter should change the logits"
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def _tamper(w_b: bytes, kind: str) -> bytes:
    """Edit the model-level A (and every per-layer copy the same way, so the file stays consistent)."""
    t = st_load(w_b)
    key = f"base_model.{kind}_A"
    edited = t[key].clone()
    edited.view(-1)[::7] *= -1.5
    for k in list(t):
        if k == key or k.endswith(f".{kind}_A"):
            t[k] = edited.clone()
    return st_save(t, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["vera", "randlora"])
def test_tampered_projections_are_stored_family(projected_adapters, base_model, base_spec, tmp_path, name):
    from peft import PeftModel

    cfg_b, w_b, _ = projected_adapters[name]
    kind = name
    bad_b = _tamper(w_b, kind)
    seed_parsed = parse_adapter(cfg_b, w_b, base_spec)
    parsed = parse_adapter(cfg_b, bad_b, base_spec)
    assert parsed.projection == "stored" and parsed.family.stored_digest is not None
    assert parsed.family.key() != seed_parsed.family.key() and "stored" in parsed.family.key()
    A, B = parsed.projections
    assert parsed.family.stored_digest == hashlib.sha256(A.numpy().tobytes() + B.numpy().tobytes()).hexdigest()[:16]
    file = st_load(bad_b)
    assert torch.equal(A, file[f"base_model.{kind}_A"]) and torch.equal(B, file[f"base_model.{kind}_B"])
    assert parsed.nbytes == seed_parsed.nbytes + A.nbytes + B.nbytes  # own projections count
    (tmp_path / "adapter_config.json").write_bytes(cfg_b)
    (tmp_path / "adapter_model.safetensors").write_bytes(bad_b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path).eval()
    assert torch.equal(getattr(loaded.base_model, f"{kind}_A")["default"], A)  # PEFT uses the file's A
    check_against_peft(parsed, loaded, base_spec, seed=3)
    # The seed projections give a different layer: the stored ones really are in use.
    path = next(iter(parsed.layers))
    assert not torch.allclose(parsed.delta_weight(path), seed_parsed.delta_weight(path), atol=1e-4)


def test_save_projection_false_with_projections_is_compared(projected_adapters, base_spec):
    """A file with projections but save_projection=false is treated like true (compared, then dropped)."""
    import json

    cfg_b, w_b, _ = projected_adapters["vera"]
    cfg = json.loads(cfg_b)
    cfg["save_projection"] = False
    parsed = parse_adapter(json.dumps(cfg).encode(), w_b, base_spec)
    assert parsed.projection == "seed"
    parsed = parse_adapter(json.dumps(cfg).encode(), _tamper(w_b, "vera"), base_spec)
    assert parsed.projection == "stored"


def test_half_precision_projection_file_is_its_own_family(projected_adapters, base_spec):
    """fp16 projections (e.g. saved from an fp16 base) are not the seed's values: kept as stored."""
    cfg_b, w_b, _ = projected_adapters["vera"]
    half = {k: v.half() for k, v in st_load(w_b).items()}
    parsed = parse_adapter(cfg_b, st_save(half), base_spec)
    assert parsed.projection == "stored"
    assert torch.equal(parsed.projections[0], half["base_model.vera_A"].float())
