"""Rotary position embeddings: the inverse frequencies of each `rope_type`, as transformers computes them."""

from __future__ import annotations

import math

import torch

from server.errors import ModelLoadError
from server.model.hf_config import ModelConfig


def inverse_frequencies(config: ModelConfig, max_len: int) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2] float32, attention scaling) for the config's RoPE variant."""
    dim = config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if rope_type == "dynamic":
        # Dynamic NTK only changes frequencies beyond the original context; refuse to go there.
        original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        if max_len <= original:
            return inv_freq, 1.0
        raise ModelLoadError(f"dynamic RoPE beyond {original} positions is not supported; use --max-model-len")
    raise ModelLoadError(f"rope_type {rope_type!r} is not supported (default, linear, llama3, dynamic)")


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(config: ModelConfig, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_len, head_dim] in the model dtype, computed in float32."""
    inv_freq, attention_scaling = inverse_frequencies(config, max_len)
    positions = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [max_len, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, 1, head_dim] (rotate-half convention of Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
