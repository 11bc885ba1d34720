"""Truncate every layer of a source to the ranks its target asks for (docs/conversion.md §2, §3).

One layer at a time: a fixed `rank` needs one pass (decompose, keep, report); an error or energy
target needs the singular values of every layer before any rank is known, so a first pass keeps only
those (no vectors) and a second pass decomposes each layer again for its factors. Both passes ask
for the same number of directions, so a randomized layer gives the same numbers twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import Target, choose_ranks
from .report import LayerReport
from .spectrum import DEFAULT_SVD, Spectrum, SvdConfig, decompose
from .updates import UpdateSource


@dataclass(slots=True)
class ConvertedLayer:
    """One layer of the converted LoRA: ΔW̃ = B A (scale 1) and an optional bias change, float32."""

    B: torch.Tensor  # [out, r]
    A: torch.Tensor  # [r, in]
    bias: torch.Tensor | None = None  # [out]


@dataclass(slots=True)
class Truncation:
    factors: dict[str, ConvertedLayer]  # layers with rank >= 1, in model order
    layers: list[LayerReport]  # every layer of the source, rank 0 included


def truncate(source: UpdateSource, target: Target, max_rank: int, svd: SvdConfig = DEFAULT_SVD) -> Truncation:
    caps = {layer.path: min(max_rank, layer.out_features, layer.in_features) for layer in source.layers}
    if target.rank is not None:
        keep, ranks = {p: min(target.rank, cap) for p, cap in caps.items()}, None
    else:
        keep = caps
        spectra = {p: decompose(source.update(p), keep[p], vectors=False, cfg=svd) for p in caps}
        ranks = choose_ranks(spectra, caps, target)
    factors: dict[str, ConvertedLayer] = {}
    reports: list[LayerReport] = []
    for p in caps:
        update = source.update(p)
        spectrum: Spectrum = decompose(update, keep[p], vectors=True, cfg=svd)
        r = min(keep[p], spectrum.numerical_rank) if ranks is None else ranks[p]
        bias = None if update.bias is None or not update.bias.any() else update.bias.float()
        if r > 0:
            B, A = spectrum.factors(r)
            factors[p] = ConvertedLayer(B.float().contiguous(), A.float().contiguous(), bias)
        elif bias is not None:  # a LoRA layer has rank >= 1: zero factors carry a bias change alone
            factors[p] = ConvertedLayer(torch.zeros(update.out_features, 1), torch.zeros(1, update.in_features), bias)
        reports.append(LayerReport.of(p, spectrum, r))
    return Truncation(factors, reports)
