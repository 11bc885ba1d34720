"""Parsed factors reproduce PEFT's own numbers for LoRA, rsLoRA, lora_bias, DoRA and AdaLoRA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store import parse_adapter

PREFIX = "base_model.model."


def peft_layers(loaded):
    """path -> PEFT tuner module, for every adapted layer of the loaded PeftModel."""
    out = {}
    for name, mod in loaded.named_modules():
        if name.startswith(PREFIX) and hasattr(mod, "lora_A") and hasattr(mod, "get_delta_weight"):
            out[name[len(PREFIX) :]] = mod
    return out


@pytest.mark.parametrize("name", ["lora_bias", "rslora", "adalora", "adalora_alpha0"])
def test_delta_weight_matches_peft(adapters, base_spec, name):
    cfg_b, w_b, loaded = adapters[name]
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    mods = peft_layers(loaded)
    assert mods, "oracle found no PEFT layers"
    dropped = 0
    for path, mod in mods.items():
        ref = mod.get_delta_weight("default").detach()
        if path not in parsed.layers:  # only AdaLoRA rank-0 layers may be dropped
            assert name.startswith("adalora") and mod.lora_A["default"].shape[0] == 0
            assert torch.count_nonzero(ref) == 0
            dropped += 1
            continue
        got = parsed.delta_weight(path)
        assert ref.abs().max() > 1e-4, f"{path}: adapter should matter"
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        w0 = base_spec.weight(path)
        torch.testing.assert_close(parsed.merged_weight(path, w0), w0 + ref, rtol=0, atol=1e-6)
    assert set(parsed.layers) <= set(mods)
    if name.startswith("adalora"):
        assert dropped >= 1, "fixture should contain a rank-0 AdaLoRA layer"
        assert parsed.kind == "adalora"
        ranks = {f.rank for f in parsed.layers.values()}
        assert len(ranks) > 1, f"ranks should be uneven, got {ranks}"


def test_all_seven_projections_and_kinds(adapters, base_spec, proj_names):
    for name, kind in [("lora_bias", "lora"), ("rslora", "rslora"), ("dora", "dora"), ("adalora", "adalora")]:
        parsed = parse_adapter(adapters[name][0], adapters[name][1], base_spec)
        assert parsed.kind == kind
        assert parsed.target_modules == sorted(proj_names)
    parsed = parse_adapter(adapters["lora_bias"][0], adapters["lora_bias"][1], base_spec)
    assert len(parsed.layers) == 14 and parsed.rank == 4
    assert parsed.nbytes == sum(f.A.nbytes + f.B.nbytes + f.bias.nbytes for f in parsed.layers.values())


def test_rslora_patterns(adapters, base_spec):
    parsed = parse_adapter(adapters["rslora"][0], adapters["rslora"][1], base_spec)
    r = {p: f.rank for p, f in parsed.layers.items()}
    assert r["model.layers.1.self_attn.k_proj"] == 6  # first matching key wins
    assert r["model.layers.0.self_attn.k_proj"] == 4
    assert r["model.layers.1.mlp.down_proj"] == 2
    assert r["model.layers.0.mlp.down_proj"] == 8
    mods = peft_layers(adapters["rslora"][2])
    # alpha_pattern made it into PEFT's scaling and ours agrees (alpha / sqrt(r)).
    assert mods["model.layers.0.self_attn.q_proj"].scaling["default"] == pytest.approx(3 / 8**0.5)
    assert mods["model.layers.1.self_attn.v_proj"].scaling["default"] == pytest.approx(32 / 8**0.5)


def test_lora_bias_forward_matches_peft(adapters, base_spec):
    cfg_b, w_b, loaded = adapters["lora_bias"]
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    g = torch.Generator().manual_seed(7)
    for path, mod in peft_layers(loaded).items():
        f = parsed.layers[path]
        assert f.bias is not None
        torch.testing.assert_close(
            f.bias, mod.lora_B["default"].bias.detach() * mod.scaling["default"], rtol=0, atol=1e-7
        )
        x = torch.randn(5, f.A.shape[1], generator=g)
        with torch.no_grad():
            ref = mod(x)
        ours = x @ base_spec.weight(path).T + ((x @ f.A.T) @ f.B.T) * f.scale + f.bias
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_dora_matches_peft_forward_and_merge(adapters, base_spec):
    cfg_b, w_b, loaded = adapters["dora"]
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    merged_model = copy.deepcopy(loaded).merge_and_unload()
    g = torch.Generator().manual_seed(8)
    mods = peft_layers(loaded)
    assert len(mods) == 14
    for path, mod in mods.items():
        f = parsed.layers[path]
        w0 = base_spec.weight(path)
        # Same numbers as PEFT's forward-time scale m / ||W0 + s * lora_B(lora_A(eye)).T||.
        dora = mod.lora_magnitude_vector["default"]
        lora_w = dora.get_lora_weight(mod.lora_A["default"], mod.lora_B["default"])
        ref_g = dora.weight / dora.get_weight_norm(w0, lora_w, mod.scaling["default"])
        assert torch.equal(f.output_scale, ref_g.detach()), f"{path}: output_scale not bit-exact"
        assert not torch.allclose(f.output_scale, torch.ones_like(f.output_scale))  # DoRA actually matters
        x = torch.randn(5, f.A.shape[1], generator=g)
        with torch.no_grad():
            ref = mod(x)
        ours = f.output_scale * (x @ w0.T + ((x @ f.A.T) @ f.B.T) * f.scale)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
        ref_w = merged_model.get_submodule(path).weight.detach()
        torch.testing.assert_close(parsed.merged_weight(path, w0), ref_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(adapters, base_model, base_spec, tmp_path, dtype):
    """fp16/bf16 adapter files are upcast; PEFT (autocast_adapter_dtype) loads the same values."""
    from peft import PeftModel

    cfg_b, w_b, _ = adapters["rslora"]
    half = {k: v.to(dtype) for k, v in st_load(w_b).items()}
    half_bytes = st_save(half, metadata={"format": "pt"})
    parsed = parse_adapter(cfg_b, half_bytes, base_spec)
    (tmp_path / "adapter_config.json").write_bytes(cfg_b)
    (tmp_path / "adapter_model.safetensors").write_bytes(half_bytes)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path)
    for path, mod in peft_layers(loaded).items():
        assert mod.lora_A["default"].weight.dtype == torch.float32
        torch.testing.assert_close(
            parsed.delta_weight(path), mod.get_delta_weight("default").detach(), rtol=0, atol=1e-6
        )


def test_fan_in_fan_out_is_ignored_for_linear(adapters, base_spec):
    cfg_b, w_b, _ = adapters["lora_bias"]
    cfg = json.loads(cfg_b)
    cfg["fan_in_fan_out"] = True
    a = parse_adapter(cfg_b, w_b, base_spec)
    b = parse_adapter(json.dumps(cfg).encode(), w_b, base_spec)
    for path in a.layers:
        assert torch.equal(a.delta_weight(path), b.delta_weight(path))
