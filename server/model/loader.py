"""Load a Hugging Face safetensors checkpoint (single file or sharded) into our packed decoder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from server.errors import ModelLoadError
from server.model.hf_config import load_model_config
from server.model.layers import AdaptedLinear
from server.model.llama import LlamaModel
from server.model.rope import rope_tables


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    return files


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _copy(param: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if param.shape != source.shape:
        raise ModelLoadError(f"checkpoint tensor {name} has shape {tuple(source.shape)}, expected {tuple(param.shape)}")
    param.copy_(source)


def _load_adapted(linear: AdaptedLinear, tensors: dict[str, torch.Tensor]) -> None:
    """Pack each slice's checkpoint weight (and bias) into the linear's output columns."""
    for s in linear.slices:
        rows = slice(s.out_start, s.out_start + s.out_features)
        _copy(linear.weight[rows], tensors.pop(f"{s.path}.weight"), f"{s.path}.weight")
        if linear.bias is not None:
            _copy(linear.bias[rows], tensors.pop(f"{s.path}.bias"), f"{s.path}.bias")


def load_model(model_dir: Path, dtype: torch.dtype, max_len: int, device: torch.device | str = "cpu") -> LlamaModel:
    config = load_model_config(model_dir)
    with torch.device("meta"):
        model = LlamaModel(config, max_len, dtype)
    model = model.to_empty(device=device).to(dtype)
    # to_empty() left the non-persistent RoPE tables uninitialised; rebuild them on the real device.
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(config, max_len, dtype))
    tensors = read_tensors(model_dir)
    try:
        with torch.no_grad():
            _copy(model.embed_tokens.weight, tensors.pop("model.embed_tokens.weight"), "model.embed_tokens.weight")
            _copy(model.norm.weight, tensors.pop("model.norm.weight"), "model.norm.weight")
            for i, layer in enumerate(model.layers):
                prefix = f"model.layers.{i}"
                _copy(layer.input_layernorm.weight, tensors.pop(f"{prefix}.input_layernorm.weight"), prefix)
                _copy(
                    layer.post_attention_layernorm.weight,
                    tensors.pop(f"{prefix}.post_attention_layernorm.weight"),
                    prefix,
                )
                for linear in (
                    layer.self_attn.qkv_proj,
                    layer.self_attn.o_proj,
                    layer.mlp.gate_up_proj,
                    layer.mlp.down_proj,
                ):
                    _load_adapted(linear, tensors)
            if model.lm_head is not None:
                _copy(model.lm_head.weight, tensors.pop("lm_head.weight"), "lm_head.weight")
    except KeyError as missing:
        raise ModelLoadError(f"checkpoint in {model_dir} lacks tensor {missing}") from None
    tensors.pop("lm_head.weight", None)  # tied checkpoints sometimes still carry a copy
    leftovers = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise ModelLoadError(f"checkpoint has tensors this decoder does not use, e.g. {leftovers[:3]}")
    return model.eval()
