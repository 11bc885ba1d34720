"""Truncate every layer of a source to the ranks its target asks for (docs/conversion.md §2, §3).

One layer at a time: a fixed `rank` needs one pass (decompose, keep, report); an error or energy
target needs the singular values of every layer before any rank is known. Its first pass keeps each
layer's singular vectors up to the layer's cap when all of them fit in `SvdConfig.keep_vectors_mb`;
otherwise it keeps only the σ's and a second pass decomposes each layer again for its factors. Both
passes ask for the same number of directions, so a randomized layer gives the same numbers twice.
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
    keep = caps if target.rank is None else {p: min(target.rank, cap) for p, cap in caps.items()}
    first: dict[str, tuple[Spectrum, torch.Tensor | None]] = {}
    ranks = None
    if target.rank is None:  # the first pass: every layer's spectrum, then the ranks
        vector_bytes = sum(8 * keep[layer.path] * (layer.out_features + layer.in_features) for layer in source.layers)
        vectors = vector_bytes <= svd.keep_vectors_mb * 2**20
        for p in caps:
            update = source.update(p)
            spectrum = decompose(update, keep[p], vectors=vectors, cfg=svd)
            first[p] = (spectrum.trimmed(keep[p]) if vectors else spectrum, update.bias)
        ranks = choose_ranks({p: spectrum for p, (spectrum, _) in first.items()}, caps, target)
    factors: dict[str, ConvertedLayer] = {}
    reports: list[LayerReport] = []
    for p in caps:
        spectrum, bias = first.get(p, (None, None))
        if spectrum is None or spectrum.U is None:
            update = source.update(p)
            spectrum, bias = decompose(update, keep[p], vectors=True, cfg=svd), update.bias
        r = min(keep[p], spectrum.numerical_rank) if ranks is None else ranks[p]
        bias = None if bias is None or not bias.any() else bias.float()
        shape = spectrum.shape
        if r > 0:
            B, A = spectrum.factors(r)
            factors[p] = ConvertedLayer(B.float().contiguous(), A.float().contiguous(), bias)
        elif bias is not None:  # a LoRA layer has rank >= 1: zero factors carry a bias change alone
            factors[p] = ConvertedLayer(torch.zeros(shape[0], 1), torch.zeros(1, shape[1]), bias)
        reports.append(LayerReport.of(p, spectrum, r))
        first.pop(p, None)  # free this layer's vectors as soon as its factors are made
    return Truncation(factors, reports)
