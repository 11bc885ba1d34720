"""The exact weight change ΔW each layer of a source makes, in float64 (docs/conversion.md §1).

A source is anything that changes some of the base model's adaptable layers: a stored adapter of
any kind, a weighted merge of several, or a full fine-tune. Each hands out one layer's update at a
time (`UpdateSource.update`), so a conversion never holds more than one dense layer in memory.

The update is what merged mode writes into the weights minus W0 (docs/adapters.md §7): for the LoRA
family, VeRA and RandLoRA that is PEFT's `get_delta_weight`; for DoRA it is `g ⊙ (W0 + sBA) − W0`,
whose `(g − 1) ⊙ W0` part is full-rank, not just `sBA`. Updates that are a product of two thin
factors are kept as factors, so their SVD needs no [out, in] matrix (docs/adapters.md §11).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from adapters_store import LayerFactors, ParsedAdapter, RandLoraFactors, TargetLayer, VeraFactors
from adapters_store.projections import randlora_layer_bases, randlora_scaled_bases, vera_layer_bases


@dataclass(slots=True)
class LayerUpdate:
    """ΔW of one layer in float64: `B @ A` (factored) or `dense`; `bias` is a change of the layer's
    bias (a LoRA `lora_bias`, or a fine-tuned bias), None when it has none."""

    path: str
    out_features: int
    in_features: int
    B: torch.Tensor | None = None  # [out, k]
    A: torch.Tensor | None = None  # [k, in]
    dense: torch.Tensor | None = None  # [out, in]
    bias: torch.Tensor | None = None  # [out]

    @property
    def inner_dim(self) -> int | None:
        """k of a factored update, None for a dense one."""
        return None if self.A is None else int(self.A.shape[0])

    def matrix(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.B @ self.A


class UpdateSource(Protocol):
    """What a conversion reads: the layers it changes (in model order) and each one's update."""

    layers: list[TargetLayer]

    def update(self, path: str) -> LayerUpdate: ...


class AdapterUpdates:
    """The updates of one parsed adapter; `base_weight(path)` is the frozen W0 (DoRA needs it)."""

    def __init__(
        self, parsed: ParsedAdapter, all_layers: dict[str, TargetLayer], base_weight: Callable[[str], torch.Tensor]
    ) -> None:
        self.parsed = parsed
        self.layers = [layer for path, layer in all_layers.items() if path in parsed.layers]
        self._by_path = {layer.path: layer for layer in self.layers}
        self.base_weight = base_weight

    def update(self, path: str) -> LayerUpdate:
        layer = self._by_path[path]
        f = self.parsed.layers[path]
        out = LayerUpdate(path, layer.out_features, layer.in_features)
        if isinstance(f, LayerFactors):
            out.B, out.A = f.B.double() * (f.scale / f.divisor), f.A.double()
            out.bias = None if f.bias is None else f.bias.double()
            if f.output_scale is not None:
                # DoRA: g ⊙ (W0 + sBA) − W0 = (g − 1) ⊙ W0 + g ⊙ (sBA), rows scaled by g.
                g = f.output_scale.double()[:, None]
                out.dense = (g - 1) * self.base_weight(path).double() + g * (out.B @ out.A)
                out.B = out.A = None
            return out
        proj_a, proj_b = (t.double() for t in self.parsed.resolve_projections())
        if isinstance(f, VeraFactors):
            A_l, B_l = vera_layer_bases(proj_a, proj_b, layer.out_features, layer.in_features)
            out.B, out.A = f.lambda_b.double()[:, None] * B_l, f.lambda_d.double()[:, None] * A_l
            return out
        if isinstance(f, RandLoraFactors):
            A_l, B_l = randlora_layer_bases(proj_a, proj_b, f.out_features, f.in_features, f.rank)
            U, V = randlora_scaled_bases(f.lam.double(), f.gamma.double(), A_l, B_l)
            # in <= out: ΔW = s V U; in > out: ΔW = s (V U)ᵀ = s Uᵀ Vᵀ (docs/adapters.md §4.4).
            out.B, out.A = (V * f.scale, U) if f.in_features <= f.out_features else (U.T * f.scale, V.T)
            return out
        raise TypeError(f"{self.parsed.kind} layer {path!r} has unknown factors {type(f).__name__}")
