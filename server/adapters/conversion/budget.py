"""How many singular directions each layer keeps (docs/conversion.md §3).

A target is one of:

* `rank`: every layer keeps min(rank, its cap, its numerical rank) directions;
* `max_relative_error` ε: a Frobenius error of at most ε relative to ‖ΔW‖_F;
* `energy` e: at least the fraction e of Σσ² kept, which is the same as ε = √(1 − e).

With `scope="total"` (the default) the error is that of the whole adapter,
`√(Σ_l ‖ΔW_l − ΔW̃_l‖_F²) ≤ ε · √(Σ_l ‖ΔW_l‖_F²)`, and ranks are allocated across layers by a greedy:
every layer's directions are candidates, each costs `out + in` parameters and removes `σ²` of
squared error, and they are taken best ratio `σ² / (out + in)` first until the error is met. Within
a layer the ratio falls with i, so each layer keeps a prefix (a truncated SVD). This is the greedy of
the fractional covering knapsack: it uses at most one direction's cost more than the fewest
parameters that meet the target, and exactly the fewest when all layers have one shape. With
`scope="layer"`, each layer meets ε against its own ‖ΔW_l‖_F with its smallest rank.

Every layer's rank is capped by `--max-lora-rank` and min(out, in); singular values below the
numerical rank tolerance count as zero (an exact target can then be met by a rank-deficient update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConversionRefused
from .spectrum import Spectrum

SCOPES = ("total", "layer")
_SLACK = 1e-12  # of ‖ΔW‖_F², added to the error budget: float64 sums of σ² round


@dataclass(frozen=True, slots=True)
class Target:
    rank: int | None = None
    max_relative_error: float | None = None
    energy: float | None = None
    scope: str = "total"

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.rank, self.max_relative_error, self.energy)]
        if sum(given) != 1:
            raise ValueError("give exactly one of rank, max_relative_error, energy")
        if self.rank is not None and self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.max_relative_error is not None and not 0 <= self.max_relative_error <= 1:
            raise ValueError("max_relative_error must be in [0, 1]")
        if self.energy is not None and not 0 <= self.energy <= 1:
            raise ValueError("energy must be in [0, 1]")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}")

    @property
    def error_sq_fraction(self) -> float:
        """ε²: the squared Frobenius error allowed, as a fraction of ‖ΔW‖_F²."""
        if self.max_relative_error is not None:
            return self.max_relative_error**2
        if self.energy is not None:
            return 1.0 - self.energy
        raise ValueError("a rank target has no error budget")

    def to_dict(self) -> dict:
        if self.rank is not None:
            return {"rank": self.rank}
        key = "max_relative_error" if self.max_relative_error is not None else "energy"
        return {key: getattr(self, key), "scope": self.scope}


def _noise_sq(s: Spectrum) -> float:
    """Squared error left by keeping every direction above the rank tolerance (rounding noise)."""
    r = s.numerical_rank
    return s.tail_sq(r) if r < len(s.sigma) else 0.0


def choose_ranks(spectra: dict[str, Spectrum], caps: dict[str, int], target: Target) -> dict[str, int]:
    """Ranks per layer (keys of `spectra`, in order) that meet `target`; ConversionRefused when the
    caps make it unreachable."""
    limits = {p: min(caps[p], s.numerical_rank) for p, s in spectra.items()}
    if target.rank is not None:
        return {p: min(target.rank, limit) for p, limit in limits.items()}
    frac = target.error_sq_fraction
    if target.scope == "layer":
        ranks, missed = {}, []
        for p, s in spectra.items():
            allowed = (frac + _SLACK) * s.total_sq + _noise_sq(s)
            ranks[p] = next((r for r in range(limits[p] + 1) if s.tail_sq(r) <= allowed), limits[p])
            if s.tail_sq(ranks[p]) > allowed:
                missed.append((p, math.sqrt(s.tail_sq(ranks[p]) / s.total_sq)))
        if missed:
            worst = max(missed, key=lambda m: m[1])
            raise ConversionRefused(
                f"{len(missed)} layers cannot meet the target within their rank cap (--max-lora-rank or "
                f"min(out, in)); e.g. {worst[0]} reaches a relative error of {worst[1]:.4g} at rank {limits[worst[0]]}"
            )
        return ranks
    total = sum(s.total_sq for s in spectra.values())
    allowed = (frac + _SLACK) * total + sum(_noise_sq(s) for s in spectra.values())
    order = {p: i for i, p in enumerate(spectra)}
    candidates = sorted(
        ((float(s.sigma[i]) ** 2 / sum(s.shape), order[p], i, p) for p, s in spectra.items() for i in range(limits[p])),
        key=lambda c: (-c[0], c[1], c[2]),
    )
    ranks = dict.fromkeys(spectra, 0)
    error = total
    for _, _, _, p in candidates:
        if error <= allowed:
            break
        error -= float(spectra[p].sigma[ranks[p]]) ** 2
        ranks[p] += 1
    if error > allowed:  # every candidate taken: each layer is at its cap
        best = sum(s.tail_sq(limits[p]) for p, s in spectra.items())
        raise ConversionRefused(
            f"the target cannot be met within the rank caps (--max-lora-rank or min(out, in)): the best reachable "
            f"relative Frobenius error is {math.sqrt(best / total):.4g}"
        )
    return ranks
