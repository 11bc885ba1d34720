"""Every adapter kind against PEFT + transformers (the oracle), on SmolLM2 and a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from server.model.loader import load_model
from tests.conftest import build_tiny_llama, drive, make_request
from tests.peft_helpers import ALL_TARGETS, load_peft, our_logits, pristine, save_peft_adapter, train_adalora


def _smol_configs():
    from peft import LoraConfig

    return {
        "lora-all7": LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS),
        "rslora-patterns": LoraConfig(
            r=16,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            rank_pattern={"k_proj": 4, "layers.3.self_attn.q_proj": 2},
            alpha_pattern={"v_proj": 32},
        ),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    }


@pytest.fixture(scope="module")
def smol_adapters(demo_runtime, hf_demo_model, tmp_path_factory):
    """name -> (version, PEFT model with that adapter), uploaded through the adapter service."""
    out = {}
    builds = {name: (cfg, None) for name, cfg in _smol_configs().items()}
    for i, (name, (cfg, _)) in enumerate(builds.items()):
        d = tmp_path_factory.mktemp(name)
        config_bytes, weights = save_peft_adapter(hf_demo_model, cfg, d, seed=10 + i)
        info = demo_runtime.adapters.upload(f"smol-{name}", config_bytes, weights)
        out[name] = (info, load_peft(hf_demo_model, d))
    d = tmp_path_factory.mktemp("adalora")
    config_bytes, weights = train_adalora(hf_demo_model, d, steps=4)
    out["adalora-trained"] = (
        demo_runtime.adapters.upload("smol-adalora", config_bytes, weights),
        load_peft(hf_demo_model, d),
    )
    return out


KINDS = ["lora-all7", "rslora-patterns", "dora", "adalora-trained"]


@pytest.mark.parametrize("name", KINDS)
def test_smollm2_logits_match_peft(demo_runtime, smol_adapters, name):
    info, peft_model = smol_adapters[name]
    ids = torch.tensor(demo_runtime.tokenizer.encode_chat([{"role": "user", "content": "Name a planet."}]))
    with torch.no_grad():
        theirs = peft_model(ids[None]).logits[0]
        with peft_model.disable_adapter():
            plain = peft_model(ids[None]).logits[0]
    parsed = demo_runtime.adapters.cache.get(info.version)
    ours = our_logits(pristine(demo_runtime), ids, parsed)
    assert (theirs - plain).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    print(f"{name}: max |ours - peft| = {(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", KINDS)
def test_smollm2_greedy_tokens_match_peft(demo_runtime, smol_adapters, name):
    info, peft_model = smol_adapters[name]
    ids = demo_runtime.tokenizer.encode_chat([{"role": "user", "content": "Tell me about cats."}])
    with torch.no_grad():
        expected = peft_model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=2
        )[0, len(ids) :].tolist()
    if 2 in expected:
        expected = expected[: expected.index(2) + 1]
    version = demo_runtime.adapters.resolve(info.adapter_id)
    request, sink = make_request("peft-greedy", ids, max_tokens=16)
    request.adapter_version = version
    drive(demo_runtime, {0: [request]})
    assert sink.token_ids == expected


def test_adalora_rank_pattern_came_from_training(smol_adapters):
    info, _ = smol_adapters["adalora-trained"]
    assert info.kind == "adalora"
    assert len(info.rank_counts) > 1, f"expected uneven ranks, got {info.rank_counts}"


TINY_CASES = ["lora-bias", "dora-with-base-bias", "rslora", "adalora"]


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_llama_with_biases_matches_peft(tmp_path, case):
    from peft import AdaLoraConfig, LoraConfig
    from transformers import LlamaForCausalLM

    from adapters_store import parse_adapter
    from server.adapters.frozen_base import FrozenBase
    from server.adapters.packing import base_model_spec

    model_dir = build_tiny_llama(tmp_path / "base", seed=7, attention_bias=True, mlp_bias=True)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = {
        "lora-bias": LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=ALL_TARGETS),
        "dora-with-base-bias": LoraConfig(r=6, lora_alpha=12, use_dora=True, target_modules=ALL_TARGETS),
        "rslora": LoraConfig(
            r=8, lora_alpha=4, use_rslora=True, target_modules=ALL_TARGETS, rank_pattern={"o_proj": 3}
        ),
        "adalora": AdaLoraConfig(init_r=5, target_r=2, lora_alpha=6, total_step=10, target_modules=ALL_TARGETS),
    }[case]
    adapter_dir = tmp_path / "adapter"
    config_bytes, weights = save_peft_adapter(hf, config, adapter_dir, seed=3, scale=0.2)
    ours_model = load_model(model_dir, torch.float32, 64)
    spec = base_model_spec(ours_model.adapted_linears(), FrozenBase.capture(ours_model.adapted_linears()), 64, 2**30)
    parsed = parse_adapter(config_bytes, weights, spec)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = load_peft(hf, adapter_dir)(ids[None]).logits[0]
    assert (our_logits(ours_model, ids, parsed) - theirs).abs().max().item() < 1e-4
