"""The base model's projection weights exactly as loaded at startup, whatever phase the engine is in.

A merged phase rebinds `AdaptedLinear.weight` to `W0 + ΔW` for a while, so anything that derives
adapter state from the base (DoRA's column norms at upload, the inputs of a merge) must never read
the live weights. It reads these: the very tensors loaded at startup (no copy), which merges never
write to (they build a new tensor and rebind, see `merge.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.layers import AdaptedLinear


@dataclass(frozen=True, slots=True)
class FrozenBase:
    weights: dict[str, torch.Tensor]  # AdaptedLinear.key -> packed weight [out, in]
    biases: dict[str, torch.Tensor | None]
    _rows: dict[str, tuple[str, slice]]  # checkpoint projection path -> (linear key, its rows)

    @classmethod
    def capture(cls, linears: list[AdaptedLinear]) -> FrozenBase:
        rows = {
            s.path: (linear.key, slice(s.out_start, s.out_start + s.out_features))
            for linear in linears
            for s in linear.slices
        }
        return cls(
            {linear.key: linear.weight.data for linear in linears},
            {linear.key: None if linear.bias is None else linear.bias.data for linear in linears},
            rows,
        )

    def weight(self, linear: AdaptedLinear) -> torch.Tensor:
        return self.weights[linear.key]

    def bias(self, linear: AdaptedLinear) -> torch.Tensor | None:
        return self.biases[linear.key]

    def projection_weight(self, path: str) -> torch.Tensor:
        """W0 [out, in] of one checkpoint projection (e.g. "model.layers.3.self_attn.k_proj")."""
        key, rows = self._rows[path]
        return self.weights[key][rows]
