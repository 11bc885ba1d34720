"""Read a Hugging Face Llama-family `config.json` into the few numbers our decoder needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "smollm", "smollm3"}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # biases on q/k/v (Qwen2 always, Llama when attention_bias is set)
    o_proj_bias: bool  # Llama's attention_bias also covers o_proj; Qwen2's o_proj has none
    mlp_bias: bool
    eos_token_ids: tuple[int, ...] = field(default=())
    bos_token_id: int | None = None


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _rope_fields(raw: dict) -> tuple[float, dict | None]:
    # transformers 5 nests RoPE under "rope_parameters"; older configs use rope_theta + rope_scaling.
    params = raw.get("rope_parameters") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or None
    if params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def load_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise ModelLoadError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint directory")
    raw = json.loads(path.read_text())
    model_type = raw.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not a Llama-family decoder we support "
            f"({', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {raw['hidden_act']!r} is not supported (SwiGLU with silu only)")
    theta, scaling = _rope_fields(raw)
    num_heads = raw["num_attention_heads"]
    generation = _read_generation_config(model_dir)
    eos = _as_tuple(generation.get("eos_token_id", raw.get("eos_token_id")))
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", model_type == "qwen2"),
        o_proj_bias=raw.get("attention_bias", False) and model_type != "qwen2",
        mlp_bias=raw.get("mlp_bias", False),
        eos_token_ids=eos,
        bos_token_id=generation.get("bos_token_id", raw.get("bos_token_id")),
    )


def _read_generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}
