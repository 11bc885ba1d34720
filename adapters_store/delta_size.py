"""Size checks on the LoRA family's per-layer update ΔW = scale / divisor · B·A.

An adapter is refused when its update cannot be a fine-tune of this base model:

* its served factors overflow float32 (the kernels multiply by ``scale`` in the model dtype);
* ``||ΔW||_F > MAX_DELTA_RATIO · ||W0||_F``. The Frobenius norm is exact and cheap: with the r x r
  Gram matrices ``A Aᵀ`` and ``Bᵀ B``, ``||B A||_F² = trace((A Aᵀ)(Bᵀ B))``, in float64, O(r²·(in+out))
  per layer instead of the O(out·in·r) of building ΔW;
* DoRA: ``||m||_2 > MAX_DELTA_RATIO · ||W0||_F``. DoRA's merged weight ``g ⊙ (W0 + ΔW)`` has row norms
  ``m`` (g = m / row norms), so ``||m||_2`` is the Frobenius norm of the weight the layer ends up with.

VeRA and RandLoRA get no ratio check: their exact ||ΔW||_F is not cheap. VeRA's needs
``Σ_i λ_b,i² · b_iᵀ D G D b_i`` over the shared basis rows, r² multiply-adds per output row and layer
(2e10 for Llama-3-8B's q/k/v/o at r=256, seconds on a CPU for an upload that now parses in ms); RandLoRA's
update is full-rank (nb·r ≥ min(out, in)), so its Gram matrices cost as much as building ΔW. A bound
would refuse legitimate adapters. Their trained vectors are checked finite on load and RandLoRA's
``randlora_alpha`` must be finite and > 0.
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidAdapter
from .types import BaseModelSpec, LayerFactors

# Legitimate adapters change a layer by a small fraction of its weight: ||ΔW|| is well below ||W0||
# (LoRA fine-tunes are typically 1e-3..1e-1 of it; even aggressive merges stay around 1x). An update
# 1000x the base weight makes the layer's outputs 1000x their trained range and the next layers'
# activations overflow (bf16/fp16 first), so the adapter cannot be what its author meant (typically a
# lora_alpha typo such as 1e30). The margin is wide on purpose: the check must never refuse a real one.
MAX_DELTA_RATIO = 1000.0


def lora_delta_norm(f: LayerFactors) -> float:
    """Exact ``||scale / divisor · B A||_F`` from the r x r Gram matrices, in float64."""
    with torch.no_grad():
        A, B = f.A.double(), f.B.double()
        fro2 = float(torch.vdot((A @ A.T).reshape(-1), (B.T @ B).reshape(-1)))  # trace(XY) = <X, Y> for symmetric Y
    return math.sqrt(max(fro2, 0.0)) * abs(f.scale / f.divisor)


def check_lora_update(
    path: str, f: LayerFactors, base: BaseModelSpec, scale_desc: str, magnitude: torch.Tensor | None = None
) -> None:
    """Refuse a LoRA-family layer whose update is not finite in float32 or absurdly large.

    ``scale_desc`` names where the scale comes from (config field and value), for the message.
    ``magnitude``: DoRA's ``lora_magnitude_vector``.
    """
    if not base.check_values:  # a stored version, checked when it was uploaded
        return
    with torch.no_grad():
        # Cheap first: a finite sum means every element is finite (AdaLoRA serves A * E: finite
        # factors, overflowing product); only a non-finite sum needs the element-wise look.
        if not torch.isfinite(f.A.sum()) and not torch.isfinite(f.A).all():
            raise InvalidAdapter(f"module {path!r}: lora_A * lora_E overflows float32")
        # Rounding is monotonic, so some scale * b overflows exactly when scale * max|b| does.
        if not torch.isfinite(f.B.abs().amax() * f.scale):
            raise InvalidAdapter(f"module {path!r}: {scale_desc} times lora_B overflows float32")
        if f.bias is not None and not torch.isfinite(f.bias).all():
            raise InvalidAdapter(f"module {path!r}: lora_B.bias times {scale_desc} overflows float32")
    delta = lora_delta_norm(f)
    w0 = base.weight_norm(path)
    if delta > MAX_DELTA_RATIO * w0:
        raise InvalidAdapter(
            f"module {path!r}: the update ||ΔW||_F = {delta:.3g} is more than {MAX_DELTA_RATIO:g}x the base "
            f"weight's ||W0||_F = {w0:.3g} (with {scale_desc}); no fine-tune changes a layer that much"
        )
    if magnitude is not None:
        m = float(torch.linalg.vector_norm(magnitude.double()))
        if m > MAX_DELTA_RATIO * w0:
            raise InvalidAdapter(
                f"module {path!r}: lora_magnitude_vector has norm {m:.3g}, more than {MAX_DELTA_RATIO:g}x the base "
                f"weight's ||W0||_F = {w0:.3g} (DoRA's merged weight has exactly that norm)"
            )
