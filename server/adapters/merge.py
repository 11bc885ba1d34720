"""Merged mode: write one adapter into the base weights, and put the exact base weights back.

`W = W0 + ΔW` (DoRA: `g ⊙ (W0 + ΔW)`) is computed in float64 from the adapter's canonical factors
and rounded once to the model dtype. Restoring copies the saved original rows back: never subtract,
so the base is bit-identical afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from adapters_store import LayerFactors, ParsedAdapter, VeraFactors
from adapters_store.projections import randlora_layer_bases, randlora_scaled_bases, vera_layer_bases
from server.model.layers import AdaptedLinear


def _merged_weight(parsed: ParsedAdapter, path: str, w0: torch.Tensor) -> torch.Tensor:
    """W0 + ΔW summed in float64 and rounded once to the model dtype: the closest merged weight
    there is (PEFT adds an already-rounded float32 ΔW, which rounds twice)."""
    f = parsed.layers[path]
    if isinstance(f, LayerFactors):
        delta = (f.B.double() @ f.A.double()) * f.scale / f.divisor
    else:
        A, B = (t.double() for t in parsed.resolve_projections())
        out_f, in_f = w0.shape
        if isinstance(f, VeraFactors):
            A_l, B_l = vera_layer_bases(A, B, out_f, in_f)
            delta = (f.lambda_b.double()[:, None] * B_l) @ (f.lambda_d.double()[:, None] * A_l)
        else:
            A_l, B_l = randlora_layer_bases(A, B, out_f, in_f, f.rank)
            U, V = randlora_scaled_bases(f.lam.double(), f.gamma.double(), A_l, B_l)
            dense = V @ U
            delta = (dense if in_f <= out_f else dense.T) * f.scale
    merged = w0.double() + delta
    if isinstance(f, LayerFactors) and f.output_scale is not None:   # DoRA replaces W
        merged = f.output_scale.double().view(-1, 1) * merged
    return merged.to(w0.dtype)


class CannotMerge(Exception):
    """The adapter changes something the base layer does not have (e.g. a lora bias, no base bias)."""


@dataclass(slots=True)
class _Saved:
    linear: AdaptedLinear
    rows: slice
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(slots=True)
class MergeState:
    version: str | None = None                    # the merged adapter, None = pristine base
    saved: list[_Saved] = field(default_factory=list)
    merges: int = 0
    restores: int = 0
    merge_seconds: float = 0.0
    restore_seconds: float = 0.0


class WeightMerger:
    def __init__(self, linears: list[AdaptedLinear]) -> None:
        self.linears = linears
        self.state = MergeState()

    @torch.no_grad()
    def merge(self, version: str, parsed: ParsedAdapter) -> float:
        """Merge `parsed` (restoring any previous merge first); returns the seconds it took."""
        if self.state.version == version:
            return 0.0
        self.restore()
        started = time.perf_counter()
        for linear in self.linears:
            for s in linear.slices:
                if s.path not in parsed.layers:
                    continue
                rows = slice(s.out_start, s.out_start + s.out_features)
                w0 = linear.weight[rows]
                b0 = None if linear.bias is None else linear.bias[rows]
                bias = parsed.merged_bias(s.path, b0)
                if bias is not None and b0 is None:
                    self.restore_saved_only()
                    raise CannotMerge(f"{s.path}: the adapter adds a bias the base layer does not have")
                self.state.saved.append(_Saved(linear, rows, w0.clone(), None if b0 is None else b0.clone()))
                w0.copy_(_merged_weight(parsed, s.path, w0))
                if bias is not None:
                    b0.copy_(bias.to(b0.dtype))
        self.state.version = version
        elapsed = time.perf_counter() - started
        self.state.merges += 1
        self.state.merge_seconds += elapsed
        return elapsed

    @torch.no_grad()
    def restore(self) -> float:
        if self.state.version is None:
            return 0.0
        started = time.perf_counter()
        self.restore_saved_only()
        self.state.version = None
        elapsed = time.perf_counter() - started
        self.state.restores += 1
        self.state.restore_seconds += elapsed
        return elapsed

    def restore_saved_only(self) -> None:
        for saved in reversed(self.state.saved):
            saved.linear.weight[saved.rows].copy_(saved.weight)
            if saved.bias is not None:
                saved.linear.bias[saved.rows].copy_(saved.bias)
        self.state.saved.clear()
