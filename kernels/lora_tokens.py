"""LoRA-family adapters in *token form* for the compiled decode step: every adapted layer's slots stacked,
and one shape-stable op that gathers each token's adapter from them.

The eager path applies adapters per row range (`kernels.batch.LoraRows`): bit-exact with PEFT, but a
Python loop whose ops depend on the step's adapter mix, so a compiled graph would be rebuilt for every
mix. Here the work is the same whatever the mix: each token t reads slot idx[t] of the stacked
buffers, and inductor fuses the gathers into two generated loops per layer (shrink, expand + epilogue),
so eight adapters cost about what one does. Not bit-exact with PEFT (the scale is folded per output
column and the reductions are inductor's, in fp32 for every dtype); the bound is measured in
tests/test_compile_decode.py. Bᵀ is stored rank-major, so the expand's reduction over r runs over
whole rows of output columns (vectorised across columns) rather than over r = 16 values per column.

Layout per AdaptedLinear (`TokenLoraLayer`), over S + 1 slots where slot S is always empty (zeros,
g = 1): base-model tokens, and tokens whose adapter does not target this layer, read slot S.
    A          [n_slices, S + 1, R, in]   A of projection j for slot s = A[j, s, :r], zero beyond r
    Bt         [S + 1, R, out]            Bᵀ of every projection, by packed output column
    col_scale  [S + 1, out] fp32          scale / divisor of the projection owning each column (0: none)
    g          [S + 1, out]               DoRA output scale, 1 where not DoRA
    bias       [S + 1, out]               lora bias · scale, 0 where absent
R is one bucket for every layer (a power of two ≥ 16, grown when a larger adapter arrives), so a
layer's shapes never depend on which adapters are loaded. The g and bias planes always exist, so DoRA
and lora-bias adapters need no other graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lora import LinearFactors

MIN_RANK_BUCKET = 16


@dataclass(slots=True)
class TokenLoraLayer:
    out_slices: list[tuple[int, int]]  # (out_start, out_features) per projection j
    A: torch.Tensor
    Bt: torch.Tensor
    col_scale: torch.Tensor
    g: torch.Tensor
    bias: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.A, self.Bt, self.col_scale, self.g, self.bias


def _rank_bucket(rank: int) -> int:
    return max(MIN_RANK_BUCKET, 1 << max(rank - 1, 0).bit_length())


class TokenLoraStack:
    """Every adapted layer's `TokenLoraLayer`, mirrored from the LoRA-family slot store's per-slot factors.

    `sync(slot_factors)` compares each slot's factor dict with the one it copied last (by identity: the
    store builds a new dict per load) and rewrites only slots that changed, so a step costs S identity
    checks. `adapts[l, s]` says whether slot s targets layer l; `token_index` turns the step's token
    slots into per-layer indices (slot S where a token's adapter skips the layer), so a token never reads
    another layer's zeros from memory, only the one empty slot.
    """

    def __init__(self, layers: list, num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.keys = [layer.key for layer in layers]
        self.index_of = {key: i for i, key in enumerate(self.keys)}
        self.shapes = {
            layer.key: (layer.in_features, [(s.out_start, s.out_features) for s in layer.slices]) for layer in layers
        }
        self.num_slots = num_slots
        self.empty_slot = num_slots
        self.dtype = dtype
        self.device = device
        self.rank = MIN_RANK_BUCKET
        self.adapts = torch.zeros(len(layers), num_slots + 1, dtype=torch.bool, device=device)
        self.users: list[set[int]] = [set() for _ in layers]  # host copy of `adapts`: slots per layer
        self.version = 0  # bumped by every write and clear
        self.layers = {key: self._alloc(key, self.rank) for key in self.keys}
        self._seen: list[dict[str, LinearFactors] | None] = [None] * num_slots
        self.writes = 0

    def _alloc(self, key: str, rank: int) -> TokenLoraLayer:
        in_f, out_slices = self.shapes[key]
        out = max(start + size for start, size in out_slices)
        slots = self.num_slots + 1
        kw = dict(dtype=self.dtype, device=self.device)
        # Normal tensors even when a rank growth happens inside a step's inference mode: compiled code is
        # specialised to a tensor's dispatch keys, and inference tensors have other ones.
        with torch.inference_mode(False):
            return TokenLoraLayer(
                out_slices,
                A=torch.zeros(len(out_slices), slots, rank, in_f, **kw),
                Bt=torch.zeros(slots, rank, out, **kw),
                col_scale=torch.zeros(slots, out, dtype=torch.float32, device=self.device),
                g=torch.ones(slots, out, **kw),
                bias=torch.zeros(slots, out, **kw),
            )

    def sync(self, slot_factors: list[dict[str, LinearFactors] | None]) -> None:
        for slot, factors in enumerate(slot_factors):
            if factors is not self._seen[slot]:
                self._clear(slot)
                if factors is not None:
                    self._write(slot, factors)
                self._seen[slot] = factors

    def token_index(self, token_slots: torch.Tensor) -> torch.Tensor:
        """[num_layers, T] slot each token reads in each layer; token_slots [T] holds S for base tokens."""
        return torch.where(self.adapts[:, token_slots], token_slots, self.empty_slot)

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.A[:, slot].zero_()
            layer.Bt[slot].zero_()
            layer.col_scale[slot].zero_()
            layer.g[slot].fill_(1.0)
            layer.bias[slot].zero_()
        self.adapts[:, slot] = False
        for users in self.users:
            users.discard(slot)
        self.version += 1

    def _write(self, slot: int, factors: dict[str, LinearFactors]) -> None:
        needed = max((s.rank for f in factors.values() for s in f.slices), default=0)
        if needed > self.rank:
            self._grow(_rank_bucket(needed))
        for key, linear in factors.items():
            layer = self.layers[key]
            for s in linear.slices:
                j = layer.out_slices.index((s.out_start, s.out_features))
                cols = slice(s.out_start, s.out_start + s.out_features)
                layer.A[j, slot, : s.rank].copy_(s.A)
                layer.Bt[slot, : s.rank, cols].copy_(s.Bt)
                layer.col_scale[slot, cols] = s.scale / s.divisor
                if s.output_scale is not None:
                    layer.g[slot, cols].copy_(s.output_scale)
                if s.bias is not None:
                    layer.bias[slot, cols].copy_(s.bias)
            self.adapts[self.index_of[key], slot] = True
            self.users[self.index_of[key]].add(slot)
        self.writes += 1
        self.version += 1

    def adapted(self, key: str) -> bool:
        """Whether any loaded slot targets layer `key`."""
        return bool(self.users[self.index_of[key]])

    def _grow(self, rank: int) -> None:
        """A rank above the bucket arrived: every layer gets the larger bucket (load time, rare)."""
        for key, old in self.layers.items():
            new = self._alloc(key, rank)
            new.A[:, :, : self.rank].copy_(old.A)
            new.Bt[:, : self.rank].copy_(old.Bt)
            for name in ("col_scale", "g", "bias"):
                getattr(new, name).copy_(getattr(old, name))
            self.layers[key] = new
        self.rank = rank


def lora_tokens(
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    A: torch.Tensor,
    Bt: torch.Tensor,
    col_scale: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor,
    slice_sizes: list[int],
    base_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [T, out] plus each token's LoRA-family delta, token t using slot idx[t] (see the module doc):
        h = x Aᵀ per projection;  δ = (h Bᵀ) · scale;  y' = y + (g − 1)(y − b0) + g δ + bias
    which is y + δ (+ bias) where g = 1. `slice_sizes`: the output columns of each packed projection,
    in order (static: the model's shapes). Computed in fp32, rounded once to y's dtype. Written as
    broadcast products and sums rather than matmuls so inductor fuses the gathers into its loops; run
    eagerly it materialises [n_slices, T, R, in] and is only meant for tests.
    """
    h = (x.float()[None, :, None, :] * A[:, idx].float()).sum(-1)  # [n_slices, T, R]
    bt = Bt[idx].float()  # [T, R, out]
    deltas, start = [], 0
    for j, size in enumerate(slice_sizes):
        deltas.append((h[j][:, :, None] * bt[:, :, start : start + size]).sum(1))  # [T, size]
        start += size
    delta = (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)) * col_scale[idx]
    yf = y.float()
    gs = g[idx].float()
    base = yf if base_bias is None else yf - base_bias.float()
    return (yf + (gs - 1) * base + gs * delta + bias[idx].float()).to(y.dtype)
