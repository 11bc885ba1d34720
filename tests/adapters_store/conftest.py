"""Shared fixtures: a tiny random Llama and genuine PEFT adapters saved from it.

PEFT is the oracle: every adapter is saved with ``save_pretrained`` and re-loaded with
``PeftModel.from_pretrained`` on a fresh copy of the base, so the tests compare against exactly
what a PEFT user of the uploaded files would get.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_store import BaseModelSpec, TargetLayer
from tests.peft_helpers import perturb

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def base_model() -> LlamaForCausalLM:
    return _tiny_llama()


def spec_for(model: torch.nn.Module, **kw) -> BaseModelSpec:
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJ:
            layers[name] = TargetLayer(name, mod.out_features, mod.in_features, mod.bias is not None)
    return BaseModelSpec(layers=layers, weight=lambda p: model.get_submodule(p).weight.detach(), **kw)


@pytest.fixture(scope="session")
def base_spec(base_model) -> BaseModelSpec:
    return spec_for(base_model)


# Test modules get these through fixtures instead of `from conftest import ...`, which could pick
# up another directory's conftest module once the repo has more than one.
@pytest.fixture(scope="session")
def spec_factory():
    return spec_for


@pytest.fixture(scope="session")
def proj_names() -> tuple[str, ...]:
    return PROJ


def _adalora_rank_pattern(peft_model, init_r: int, seed: int) -> dict[str, list[bool]]:
    """Uneven masks: one layer pruned to rank 0, one kept full, the rest random."""
    g = torch.Generator().manual_seed(seed)
    paths = sorted(
        n[len("base_model.model.") :]
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_E") and n.startswith("base_model.model.")
    )
    pattern = {}
    for i, path in enumerate(paths):
        if i == 0:
            mask = [False] * init_r
        elif i == 1:
            mask = [True] * init_r
        else:
            mask = (torch.rand(init_r, generator=g) < 0.5).tolist()
        pattern[f"{path}.lora_E"] = mask
    return pattern


def build_adapter(
    base_model, config, tmp_dir: Path, seed: int, adalora_init_r: int | None = None, noise_scale: float = 0.1
):
    """Wrap a copy of the base, perturb, save; returns (config_bytes, weights_bytes, loaded PeftModel)."""
    from peft import PeftModel, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base_model), config)
        perturb(peft_model, seed, noise_scale)  # 0.1 keeps |ΔW| ~ 0.1-1: float32 rounding << 1e-6
        if adalora_init_r is not None:
            peft_model.peft_config["default"].rank_pattern = _adalora_rank_pattern(peft_model, adalora_init_r, seed)
        peft_model.save_pretrained(tmp_dir)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_dir).eval()
    return (tmp_dir / "adapter_config.json").read_bytes(), (tmp_dir / "adapter_model.safetensors").read_bytes(), loaded


@pytest.fixture(scope="session")
def adapters(base_model, tmp_path_factory):
    """name -> (config_bytes, weights_bytes, loaded PEFT model)."""
    from peft import AdaLoraConfig, LoraConfig

    configs = {
        "lora_bias": (LoraConfig(r=4, lora_alpha=16, target_modules=list(PROJ), lora_bias=True), None),
        "rslora": (
            LoraConfig(
                r=8,
                lora_alpha=8,
                use_rslora=True,
                target_modules=list(PROJ),
                # First matching key wins: layer-1 k_proj gets 6, layer-0 k_proj gets 4. PEFT writes the
                # config with sorted keys, so the order must also hold after sorting.
                rank_pattern={
                    "model.layers.1.self_attn.k_proj": 6,
                    "self_attn.k_proj": 4,
                    "model.layers.1.mlp.down_proj": 2,
                },
                alpha_pattern={"v_proj": 32, "layers.0.self_attn.q_proj": 3, "gate_proj": 5.5},
            ),
            None,
        ),
        "dora": (LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=list(PROJ)), None),
        "adalora": (AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, total_step=10, target_modules=list(PROJ)), 6),
        "adalora_alpha0": (
            AdaLoraConfig(init_r=4, target_r=2, lora_alpha=0, total_step=10, target_modules=["q_proj", "v_proj"]),
            4,
        ),
    }
    out = {}
    for i, (name, (cfg, init_r)) in enumerate(configs.items()):
        d = tmp_path_factory.mktemp(name)
        out[name] = build_adapter(base_model, cfg, d, seed=100 + i, adalora_init_r=init_r)
    return out


# VeRA / RandLoRA adapters for the equivalence tests: name -> (config, noise scale). VeRA's delta is
# a product of four small factors, so its lambdas get unit noise to make every layer matter.
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def projected_configs() -> dict:
    from peft import RandLoraConfig, VeraConfig

    return {
        "vera": (VeraConfig(r=16, target_modules=QKVO), 1.0),
        "vera_noproj": (VeraConfig(r=16, projection_prng_key=9, target_modules=QKVO, save_projection=False), 1.0),
        "vera_all_r7": (VeraConfig(r=7, projection_prng_key=123, target_modules="all-linear"), 1.0),
        "randlora": (RandLoraConfig(r=8, randlora_alpha=16, target_modules=QKVO), 0.1),
        "randlora_noproj": (
            RandLoraConfig(r=6, randlora_alpha=30, projection_prng_key=1, target_modules=QKVO, save_projection=False),
            0.1,
        ),
        "randlora_sparse_all": (
            RandLoraConfig(r=7, randlora_alpha=14, projection_prng_key=3, sparse=True, target_modules=list(PROJ)),
            0.1,
        ),
        "randlora_vsparse_noproj": (
            RandLoraConfig(
                r=8,
                randlora_alpha=640,
                projection_prng_key=11,
                very_sparse=True,
                target_modules=QKVO,
                save_projection=False,
            ),
            0.01,
        ),
    }


@pytest.fixture(scope="session")
def projected_adapters(base_model, tmp_path_factory):
    """name -> (config_bytes, weights_bytes, loaded PEFT model) for VeRA / RandLoRA."""
    out = {}
    for i, (name, (cfg, noise)) in enumerate(projected_configs().items()):
        d = tmp_path_factory.mktemp(name)
        out[name] = build_adapter(base_model, cfg, d, seed=200 + i, noise_scale=noise)
    return out
