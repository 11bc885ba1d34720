"""Merged mode: write one adapter into the base weights, and put the exact base weights back.

`W = W0 + ΔW` (DoRA: `g ⊙ (W0 + ΔW)`) is computed in float32 from the adapter's canonical factors
and the frozen base's W0, cast once to the model dtype, into a new tensor per affected (packed)
weight. Restoring rebinds the frozen base's tensors: nothing is subtracted or recomputed, so the base
is bit-identical afterwards, and a restore costs no copy at all. Nothing here writes into a frozen
base tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from adapters_store import ParsedAdapter
from server.adapters.frozen_base import FrozenBase
from server.model.layers import AdaptedLinear


class CannotMerge(Exception):
    """The adapter changes something the base layer does not have (e.g. a lora bias, no base bias)."""


@dataclass(slots=True)
class MergeState:
    version: str | None = None  # the merged adapter, None = pristine base
    merged: list[AdaptedLinear] = field(default_factory=list)  # layers whose weights are rebound


class WeightMerger:
    def __init__(self, linears: list[AdaptedLinear], base: FrozenBase) -> None:
        self.linears = linears
        self.base = base
        self.state = MergeState()

    @torch.no_grad()
    def merge(self, version: str, parsed: ParsedAdapter) -> float:
        """Merge `parsed` (restoring any previous merge first); returns the seconds it took."""
        if self.state.version == version:
            return 0.0
        self.restore()
        started = time.perf_counter()
        try:
            for linear in self.linears:
                targeted = [s for s in linear.slices if s.path in parsed.layers]
                if targeted:
                    self._merge_linear(linear, targeted, parsed)
        except CannotMerge:
            self._rebind_originals()
            raise
        self.state.version = version
        return time.perf_counter() - started

    def _merge_linear(self, linear: AdaptedLinear, targeted: list, parsed: ParsedAdapter) -> None:
        base_bias = self.base.bias(linear)
        weight = self.base.weight(linear).clone()
        bias = None if base_bias is None else base_bias.clone()
        for s in targeted:
            rows = slice(s.out_start, s.out_start + s.out_features)
            # The parsed adapter lives in host memory: the float32 math runs there (a no-op move on CPU).
            merged_bias = parsed.merged_bias(s.path, None if bias is None else bias[rows].cpu())
            if merged_bias is not None and bias is None:
                raise CannotMerge(f"{s.path}: the adapter adds a bias the base layer does not have")
            weight[rows] = parsed.merged_weight(s.path, weight[rows].cpu()).to(weight.device, weight.dtype)
            if merged_bias is not None:
                bias[rows] = merged_bias.to(bias.device, bias.dtype)
        self.state.merged.append(linear)
        linear.weight.data = weight
        if bias is not None:
            linear.bias.data = bias

    @torch.no_grad()
    def restore(self) -> float:
        if self.state.version is None:
            return 0.0
        started = time.perf_counter()
        self._rebind_originals()
        self.state.version = None
        return time.perf_counter() - started

    def _rebind_originals(self) -> None:
        for linear in self.state.merged:
            linear.weight.data = self.base.weight(linear)
            if linear.bias is not None:
                linear.bias.data = self.base.bias(linear)
        self.state.merged.clear()
