"""A checkpoint directory with the demo model's shapes and random weights, for machines without its files.

The GPU machines this project may borrow have no network and take few files along, so their benchmarks
cannot read SmolLM2's weights: speed depends only on the shapes, so random weights of those shapes (and a
word-level tokenizer of its vocabulary size) measure the same thing. Not for anything that checks outputs.

Usage: python benchmarks/random_model.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# SmolLM2-135M-Instruct's config.json (the shapes are what matters).
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "torch_dtype": "float32",
}


def _weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    normal = lambda *shape: torch.randn(*shape, generator=gen) * 0.02
    tensors = {
        "model.embed_tokens.weight": normal(config["vocab_size"], hidden),
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(q, hidden),
            p + "self_attn.k_proj.weight": normal(kv, hidden),
            p + "self_attn.v_proj.weight": normal(kv, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    return tensors


def _tokenizer(vocab_size: int) -> dict:
    """A word-level tokenizer.json: token i is the word `w<i>` (0-2 are <unk>, <s>, </s>); any other word
    is <unk>. Prompts made of ordinary text encode to a run of <unk> ids, which is all a benchmark needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return json.loads(tokenizer.to_str())


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """tokenizer.json (word level, see `_tokenizer`) and tokenizer_config.json into `path`; returns it."""
    (path / "tokenizer.json").write_text(json.dumps(_tokenizer(vocab_size)))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def write_random_model(path: Path, config: dict = SMOLLM2_135M, seed: int = 0) -> Path:
    """Write config.json, model.safetensors (random, fp32) and a tokenizer into `path`; returns it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_weights(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    return write_tokenizer(path, config["vocab_size"])


if __name__ == "__main__":
    print(write_random_model(Path(sys.argv[1])))
