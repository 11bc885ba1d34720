"""Weighted merges of several sources' updates, layer by layer (docs/conversion.md §6).

The methods are PEFT 0.21.2's (`utils/merge_utils.py`) applied to each layer's exact update ΔW_i,
which is what `LoraModel.add_weighted_adapter` does for its SVD combination types before truncating:
our `linear` is its `svd` (task arithmetic Σ w_i ΔW_i), `ties` its `ties_svd`, `dare_linear` and
`dare_ties` its `dare_linear_svd` / `dare_ties_svd`. (Its factor-wise `linear` / `ties` / `dare_*`
combine the A's and B's separately, which is not a combination of the updates and needs LoRAs of one
rank; a merge here takes any kinds.) A layer is merged over the sources that adapt it, as PEFT does.

DARE's random masks come from a generator seeded per layer (`layer_seed`), so a merge is reproducible
whatever other layers it has; PEFT draws from the global generator, so `torch.manual_seed(layer_seed(...))`
before PEFT's function gives the same mask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from adapters_store import TargetLayer

from .updates import AdapterUpdates, LayerUpdate

METHODS = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def layer_seed(seed: int, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True, slots=True)
class Combination:
    method: str
    density: float | None = None  # fraction of entries kept by ties / dare
    majority_sign_method: str = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"combination must be one of {METHODS}")
        if self.method == "linear" and self.density is not None:
            raise ValueError("linear takes no density")
        if self.method != "linear" and (self.density is None or not 0 < self.density <= 1):
            raise ValueError(f"{self.method} needs a density in (0, 1]")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}")

    def to_dict(self) -> dict:
        out: dict = {"method": self.method}
        if self.method != "linear":
            out["density"] = self.density
        if self.method in ("ties", "dare_ties"):
            out["majority_sign_method"] = self.majority_sign_method
        if self.method.startswith("dare"):
            out["seed"] = self.seed
        return out


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's magnitude_based_pruning: keep the int(density · numel) largest |entries|."""
    if density >= 1:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.view(t.shape)


def _random_prune(t: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    """PEFT's random_pruning with rescale: a Bernoulli(density) mask, then / density. The mask is drawn
    over a float32 tensor like PEFT's (the draws, not the values, decide it)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(t.shape, density, dtype=torch.float32), generator=g)
    return t * mask.to(t.dtype) / density


def combine(deltas: list[torch.Tensor], weights: list[float], how: Combination, g: torch.Generator) -> torch.Tensor:
    """One layer's merged update from its sources' updates (PEFT's task_arithmetic / ties / dare_*)."""
    if how.method in ("ties", "dare_ties"):
        pruned = [
            _magnitude_prune(d, how.density) if how.method == "ties" else _random_prune(d, how.density, g)
            for d in deltas
        ]
        stacked = torch.stack(pruned)
        sign = stacked.sign()
        magnitude = stacked.sum(dim=0) if how.majority_sign_method == "total" else sign.sum(dim=0)
        elected = sign == torch.where(magnitude >= 0, 1.0, -1.0).to(stacked.dtype)  # on the unweighted tensors
        weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)
        return (weighted * elected).sum(dim=0) / torch.clamp(elected.sum(dim=0), min=1.0)
    if how.method == "dare_linear":
        deltas = [_random_prune(d, how.density, g) for d in deltas]
    return sum(w * d for w, d in zip(weights, deltas))


class MergedUpdates:
    """The updates of a weighted merge of several adapters (an UpdateSource)."""

    def __init__(self, sources: list[AdapterUpdates], weights: list[float], how: Combination, order: list[str]) -> None:
        self.sources = sources
        self.weights = weights
        self.how = how
        by_path: dict[str, TargetLayer] = {layer.path: layer for s in sources for layer in s.layers}
        self.layers = [by_path[p] for p in order if p in by_path]

    def update(self, path: str) -> LayerUpdate:
        present = [(s.update(path), w) for s, w in zip(self.sources, self.weights) if path in s.parsed.layers]
        g = torch.Generator().manual_seed(layer_seed(self.how.seed, path))
        first = present[0][0]
        out = LayerUpdate(path, first.out_features, first.in_features)
        if self.how.method == "linear" and all(u.inner_dim is not None for u, _ in present):
            # Σ w_i B_i A_i = [w_1 B_1 … w_n B_n] [A_1; …; A_n]: still factored, so its SVD stays cheap.
            out.B = torch.cat([w * u.B for u, w in present], dim=1)
            out.A = torch.cat([u.A for u, _ in present], dim=0)
            return out
        out.dense = combine([u.matrix() for u, _ in present], [w for _, w in present], self.how, g)
        return out
