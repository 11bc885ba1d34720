"""What a conversion reports, per layer and in total (docs/conversion.md §4).

Errors are those of the adapter produced against the source's exact update ΔW: spectral
`σ_{r+1}` (relative to ‖ΔW‖_2 = σ_1) and Frobenius `√(Σ_{i>r} σ_i²)` (relative to ‖ΔW‖_F). By
Eckart–Young–Mirsky no rank-r adapter has a smaller error in either norm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .spectrum import Spectrum


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LayerReport:
    path: str
    rank: int
    out_features: int
    in_features: int
    svd: str  # "factored" | "exact" | "randomized" (spectrum.py)
    norm_2: float  # ‖ΔW‖_2 = σ_1
    norm_fro: float  # ‖ΔW‖_F
    sigma_next: float  # σ_{r+1} = ‖ΔW − ΔW_r‖_2
    frobenius_error: float  # ‖ΔW − ΔW_r‖_F
    spectral_error_rel: float  # σ_{r+1} / σ_1
    frobenius_error_rel: float  # ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F

    @classmethod
    def of(cls, path: str, spectrum: Spectrum, rank: int) -> LayerReport:
        out_f, in_f = spectrum.shape
        norm_fro = math.sqrt(spectrum.total_sq)
        sigma_next = spectrum.sigma_after(rank)
        fro = math.sqrt(spectrum.tail_sq(rank))
        return cls(
            path,
            rank,
            out_f,
            in_f,
            spectrum.method,
            spectrum.sigma_1,
            norm_fro,
            sigma_next,
            fro,
            _ratio(sigma_next, spectrum.sigma_1),
            _ratio(fro, norm_fro),
        )

    @property
    def params(self) -> int:
        return self.rank * (self.out_features + self.in_features)

    def to_dict(self) -> dict:
        return {**asdict(self), "params": self.params}


def totals(layers: list[LayerReport]) -> dict:
    """The whole adapter: Σ ranks and parameters, and its errors over all layers together."""
    total_sq = sum(layer.norm_fro**2 for layer in layers)
    error_sq = sum(layer.frobenius_error**2 for layer in layers)
    return {
        "layers": len(layers),
        "layers_kept": sum(1 for layer in layers if layer.rank > 0),
        "rank_sum": sum(layer.rank for layer in layers),
        "max_rank": max((layer.rank for layer in layers), default=0),
        "params": sum(layer.params for layer in layers),
        "norm_fro": math.sqrt(total_sq),
        "frobenius_error": math.sqrt(error_sq),
        "frobenius_error_rel": _ratio(math.sqrt(error_sq), math.sqrt(total_sq)),
        "energy_kept": 1.0 - _ratio(error_sq, total_sq) if total_sq > 0 else 1.0,
        "spectral_error_rel_max": max((layer.spectral_error_rel for layer in layers), default=0.0),
    }
