"""A full fine-tune of the base model as a source: ΔW = W_ft − W0 per adaptable layer (docs/conversion.md §7).

The fine-tuned weights are one safetensors file on disk (the route spools the upload there), read
with `safe_open`: its header is parsed by the safetensors library, and each layer's tensor is read
from the memory-mapped file only when that layer is converted, so memory holds one layer at a time
however large the file is. Keys are the checkpoint's own (`model.layers.3.self_attn.k_proj.weight`,
and `.bias` for biased layers). Tensors for anything an adapter cannot change (embeddings, norms,
lm_head) are listed as ignored in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adapters_store import MalformedUpload, TargetLayer

from .errors import ConversionRefused
from .updates import LayerUpdate

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LISTED = 20  # ignored tensors named in the report


def _selected(path: str, targets: list[str] | None) -> bool:
    return targets is None or any(path == t or path.endswith("." + t) for t in targets)


class FullFineTune:
    def __init__(
        self,
        file: Path,
        all_layers: dict[str, TargetLayer],
        base_weight: Callable[[str], torch.Tensor],
        base_bias: Callable[[str], torch.Tensor | None],
        targets: list[str] | None = None,
    ) -> None:
        try:
            self._file = safe_open(str(file), framework="pt")
            keys = set(self._file.keys())
        except SafetensorError as exc:
            raise MalformedUpload(f"the fine-tuned weights are not a safetensors file: {exc}") from None
        self._keys = keys
        self.base_weight = base_weight
        self.base_bias = base_bias
        self.layers = [
            layer for path, layer in all_layers.items() if path + ".weight" in keys and _selected(path, targets)
        ]
        if not self.layers:
            wanted = "" if targets is None else f" among {targets}"
            raise ConversionRefused(f"the file has no weight of an adaptable layer of the base model{wanted}")
        self._by_path = {layer.path: layer for layer in self.layers}
        used = {layer.path + suffix for layer in self.layers for suffix in (".weight", ".bias")}
        self.ignored = sorted(keys - used)
        for layer in self.layers:
            self._check(layer.path + ".weight", (layer.out_features, layer.in_features))
            if layer.path + ".bias" in keys:
                if not layer.has_bias:
                    raise ConversionRefused(f"{layer.path}.bias: the base layer has no bias")
                self._check(layer.path + ".bias", (layer.out_features,))

    def _check(self, key: str, shape: tuple[int, ...]) -> None:
        info = self._file.get_slice(key)
        if tuple(info.get_shape()) != shape:
            raise ConversionRefused(f"{key} has shape {info.get_shape()}, the base model's is {list(shape)}")
        if info.get_dtype() not in _FLOAT_DTYPES:
            raise ConversionRefused(f"{key} has dtype {info.get_dtype()}, expected a float dtype")

    def _read(self, key: str) -> torch.Tensor:
        t = self._file.get_tensor(key).double()
        if not torch.isfinite(t).all():
            raise ConversionRefused(f"{key} has NaN or Inf values")
        return t

    def update(self, path: str) -> LayerUpdate:
        layer = self._by_path[path]
        dense = self._read(path + ".weight") - self.base_weight(path).double()
        out = LayerUpdate(path, layer.out_features, layer.in_features, dense=dense)
        base_bias = self.base_bias(path)
        if base_bias is not None and path + ".bias" in self._keys:
            out.bias = self._read(path + ".bias") - base_bias.double()
        return out

    def describe(self) -> dict:
        return {
            "kind": "full",
            "layers": len(self.layers),
            "ignored_tensors": len(self.ignored),
            "ignored_examples": self.ignored[:_LISTED],
        }
