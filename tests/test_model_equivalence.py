"""Our decoder's logits equal transformers' on the same checkpoint (float32, within 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from server.model.context import ForwardContext
from server.model.loader import load_model
from tests.conftest import build_tiny_llama


def _prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    n = len(ids)
    keys = [torch.zeros(n, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    values = [torch.zeros_like(k) for k in keys]
    ctx = ForwardContext.prefills_only([ids])
    return model(ctx, keys, values)


def _hf_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0]


def test_demo_model_logits_match_transformers(demo_model_dir, hf_demo_model):
    ids = torch.tensor([1, 504, 3458, 314, 260, 3575, 282, 4649, 47, 2, 198, 9519, 30, 1380] * 4)
    ours = _prefill_logits(load_model(demo_model_dir, torch.float32, 128), ids)
    with torch.no_grad():
        theirs = hf_demo_model(ids[None]).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4


TINY_VARIANTS = {
    "llama-untied-gqa": {},
    "tied-mha": {"tie_word_embeddings": True, "num_key_value_heads": 4},
    "qwen2-style-bias": {"attention_bias": True, "mlp_bias": True},
    "llama3-rope-scaling": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "linear-rope-scaling": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
}


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_tiny_llama_logits_match_transformers(tmp_path, variant):
    model_dir = build_tiny_llama(tmp_path / variant, seed=len(variant), **TINY_VARIANTS[variant])
    ids = torch.randint(0, 300, (90,), generator=torch.Generator().manual_seed(1))
    ours = _prefill_logits(load_model(model_dir, torch.float32, 128), ids)
    assert (ours - _hf_logits(model_dir, ids)).abs().max().item() < 1e-4


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    from transformers import LlamaForCausalLM

    single = build_tiny_llama(tmp_path / "single", seed=3)
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="100KB")
    assert json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    ids = torch.arange(40)
    a = _prefill_logits(load_model(single, torch.float32, 64), ids)
    b = _prefill_logits(load_model(sharded, torch.float32, 64), ids)
    assert torch.equal(a, b)
