"""Regenerated VeRA / RandLoRA projections are bit-identical to PEFT's (docs/adapters.md §6.3 checkpoints + 2)."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings

import pytest
import torch
from safetensors.torch import load as st_load

from adapters_store import (
    ProjectionFamily,
    generate_projections,
    parse_adapter,
    randlora_layer_bases,
    vera_layer_bases,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKVO = ALL[:4]


def _checkpoints():
    from peft import RandLoraConfig, VeraConfig

    R = RandLoraConfig
    # name: (config, expected (A shape, B shape) or None) -- docs/adapters.md §6.3
    return {
        "vera_r16_k0_qkvo": (VeraConfig(r=16, target_modules=QKVO), ((16, 64), (64, 16))),
        "vera_r7_k123_all": (VeraConfig(r=7, projection_prng_key=123, target_modules=ALL), ((7, 128), (128, 7))),
        "vera_r16_k5_kv": (
            VeraConfig(r=16, projection_prng_key=5, target_modules=["k_proj", "v_proj"]),
            ((16, 64), (32, 16)),
        ),
        "vera_r8_k2_down": (VeraConfig(r=8, projection_prng_key=2, target_modules=["down_proj"]), ((8, 128), (64, 8))),
        "rl_r8_k0_qkvo": (R(r=8, target_modules=QKVO), ((8, 1, 64), (64, 8, 8))),
        "rl_r7_k99_all": (R(r=7, projection_prng_key=99, target_modules=ALL), ((7, 1, 128), (128, 19, 7))),
        "rl_r6_k1_kv": (R(r=6, projection_prng_key=1, target_modules=["k_proj", "v_proj"]), ((6, 1, 32), (64, 6, 6))),
        "rl_r5_k8_up": (R(r=5, projection_prng_key=8, target_modules=["up_proj"]), ((5, 1, 64), (128, 13, 5))),
        "rl_sparse_r7_k3_all": (R(r=7, projection_prng_key=3, sparse=True, target_modules=ALL), None),
        "rl_sparse_r8_k7_qkvo": (R(r=8, projection_prng_key=7, sparse=True, target_modules=QKVO), None),
        "rl_vsparse_r7_k4_all": (R(r=7, projection_prng_key=4, very_sparse=True, target_modules=ALL), None),
        "rl_vsparse_r8_k11_qkvo": (R(r=8, projection_prng_key=11, very_sparse=True, target_modules=QKVO), None),
        # Beyond §6.3: non-square families, where very_sparse's sqrt(min(O, I)) differs from sqrt(max).
        "rl_vsparse_r4_k6_kv": (
            R(r=4, projection_prng_key=6, very_sparse=True, target_modules=["k_proj", "v_proj"]),
            ((4, 1, 32), (64, 8, 4)),
        ),
        "rl_sparse_r5_k2_gate": (
            R(r=5, projection_prng_key=2, sparse=True, target_modules=["gate_proj"]),
            ((5, 1, 64), (128, 13, 5)),
        ),
    }


def _save(base_model, config, tmp_path):
    """save_pretrained without training: the file holds exactly PEFT's projections."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base_model), config)
        model.save_pretrained(tmp_path)
    return (tmp_path / "adapter_config.json").read_bytes(), (tmp_path / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def saved(base_model, tmp_path_factory):
    return {
        name: (_save(base_model, cfg, tmp_path_factory.mktemp(name)), shapes)
        for name, (cfg, shapes) in _checkpoints().items()
    }


@pytest.mark.parametrize("name", list(_checkpoints()))
def test_regenerated_equals_peft_saved(saved, base_spec, name):
    (cfg_b, w_b), shapes = saved[name]
    kind = "vera" if name.startswith("vera") else "randlora"
    file = st_load(w_b)
    ref_A, ref_B = file[f"base_model.{kind}_A"], file[f"base_model.{kind}_B"]
    if shapes is not None:
        assert (tuple(ref_A.shape), tuple(ref_B.shape)) == shapes
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    fam = parsed.family
    assert parsed.kind == kind and parsed.projection == "seed" and parsed.projections is None
    assert fam.stored_digest is None
    assert fam.sparsity == ("very_sparse" if "vsparse" in name else "sparse" if "sparse" in name else "dense")
    assert fam.basis_dtype == ("bfloat16" if kind == "randlora" and fam.sparsity == "dense" else "float32")
    A, B = generate_projections(fam)
    assert A.dtype == B.dtype == torch.float32
    assert torch.equal(A, ref_A) and torch.equal(B, ref_B), f"{name}: not bit-exact"
    if kind == "randlora":  # every per-layer copy equals the model-level tensor (docs/adapters.md §4.2)
        copies = [k for k in file if re.search(r"\.randlora_[AB]$", k) and k.startswith("base_model.model.")]
        assert len(copies) == 2 * len(parsed.layers)
    if fam.sparsity != "dense":  # ternary up to the std normalisation
        assert len(torch.unique(A)) == 3 and len(torch.unique(B)) == 3


def test_dtype_and_sparsity_choices_matter(saved, base_spec):
    """Negative controls: the comparison above can fail (fp32 dense bases, wrong draw order, seed, shape)."""
    (cfg_b, w_b), _ = saved["rl_r8_k0_qkvo"]
    ref = st_load(w_b)["base_model.randlora_A"]
    fam = parse_adapter(cfg_b, w_b, base_spec).family
    for other in (
        dataclasses.replace(fam, basis_dtype="float32"),
        dataclasses.replace(fam, basis_dtype="float16"),
        dataclasses.replace(fam, seed=1),
        dataclasses.replace(fam, sparsity="sparse", basis_dtype="float32"),
    ):
        assert not torch.equal(generate_projections(other)[0], ref)
    (cfg_b, w_b), _ = saved["vera_r16_k5_kv"]
    fam = parse_adapter(cfg_b, w_b, base_spec).family
    assert (fam.max_out, fam.max_in) == (32, 64)  # max over the adapter's own layers, not the whole model
    ref_A, ref_B = st_load(w_b)["base_model.vera_A"], st_load(w_b)["base_model.vera_B"]
    taller = generate_projections(dataclasses.replace(fam, max_out=64))
    # docs/adapters.md §9.3: same max in -> same A, and B's first rows agree (A is drawn first) ...
    assert torch.equal(taller[0], ref_A) and torch.equal(taller[1][:32], ref_B)
    # ... but a wider A consumes more of the stream, so B changes.
    wider = generate_projections(dataclasses.replace(fam, max_in=128))
    assert torch.equal(wider[0][:, :64], ref_A) is False and not torch.equal(wider[1], ref_B)


@pytest.mark.parametrize("name", ["vera_noproj", "randlora_noproj", "randlora_vsparse_noproj"])
def test_regenerated_equals_peft_loaded_without_projection(projected_adapters, base_spec, name):
    """save_projection=false: PEFT regenerates at load; ours must equal its in-memory buffers."""
    cfg_b, w_b, loaded = projected_adapters[name]
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    kind = parsed.kind
    assert not any(k.startswith(f"base_model.{kind}_") for k in st_load(w_b))
    A, B = generate_projections(parsed.family)
    assert torch.equal(A, getattr(loaded.base_model, f"{kind}_A")["default"])
    assert torch.equal(B, getattr(loaded.base_model, f"{kind}_B")["default"])


def test_family_key_and_stored_family():
    fam = ProjectionFamily("randlora", 7, 8, 128, 64, "sparse", "float32")
    assert fam.key() == "randlora-k7-r8-o128-i64-sparse-float32"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", fam.key())
    assert fam.shapes() == ((8, 1, 64), (128, 8, 8))
    stored = dataclasses.replace(fam, stored_digest="0123456789abcdef")
    assert stored.key() != fam.key() and "0123456789abcdef" in stored.key()
    assert {fam: 1, stored: 2}[fam] == 1  # hashable, usable as a dict key
    with pytest.raises(ValueError, match="stored"):
        generate_projections(stored)
    with pytest.raises(ValueError, match="invalid"):
        generate_projections(ProjectionFamily("ia3", 0, 4, 8, 8, "dense", "float32"))
    # Same inputs, fresh but identical tensors (no hidden global RNG state).
    a1, b1 = generate_projections(fam)
    torch.manual_seed(99)
    a2, b2 = generate_projections(fam)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and a1.data_ptr() != a2.data_ptr()


def test_layer_base_views():
    vA, vB = generate_projections(ProjectionFamily("vera", 0, 5, 128, 64, "dense", "float32"))
    A_l, B_l = vera_layer_bases(vA, vB, 32, 48)
    assert A_l.shape == (5, 48) and B_l.shape == (32, 5)
    assert A_l.data_ptr() == vA.data_ptr()  # views, no copies
    rA, rB = generate_projections(ProjectionFamily("randlora", 0, 8, 128, 64, "dense", "bfloat16"))
    assert rA.shape == (8, 1, 64) and rB.shape == (128, 8, 8)
    A_l, B_l = randlora_layer_bases(rA, rB, 32, 64, 8)  # min 32 -> 4 bases, max 64
    assert A_l.shape == (8, 1, 32) and B_l.shape == (64, 4, 8)
    A_l, B_l = randlora_layer_bases(rA, rB, 128, 20, 8)  # min 20 -> ceil(2.5) = 3 bases
    assert A_l.shape == (8, 1, 20) and B_l.shape == (128, 3, 8)
