"""DoRA's per-row output scale, computed the way PEFT's forward computes it.

PEFT (``tuners/lora/dora.py::DoraLinearLayer``) recomputes, on every forward,
    lora_weight = lora_B(lora_A(eye(in))).T          # B0 @ A0, unscaled
    norm        = ||W0 + s * lora_weight||_row
    g           = m / norm
from the *current* base weight. Our base weights are frozen, so g is computed once here, in
float32, from the unscaled factors (before the scale is folded into B), and served as
``output_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidAdapter


def dora_output_scale(
    path: str, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor, w0: torch.Tensor
) -> torch.Tensor:
    out_f, in_f = B.shape[0], A.shape[1]
    if tuple(w0.shape) != (out_f, in_f):
        # The server handed us a weight that disagrees with its own TargetLayer: a server bug.
        raise ValueError(f"base weight of {path!r} has shape {list(w0.shape)}, expected {[out_f, in_f]}")
    w0 = w0.detach().to(torch.float32)
    with torch.no_grad():
        # F.linear(eye, A) is exactly A.T (multiplying by 1 and adding zeros is exact), so we skip
        # the in x in identity matmul but keep PEFT's second matmul, F.linear(A.T, B), so the
        # summation order (and therefore the rounding) is the same as PEFT's.
        lora_weight = F.linear(A.t().contiguous(), B).t()
        norm = torch.linalg.norm(w0 + scale * lora_weight, dim=1)
        g = magnitude / norm
    if not torch.isfinite(g).all():
        raise InvalidAdapter(
            f"DoRA layer {path!r}: a row of W0 + ΔW has zero norm, lora_magnitude_vector scale is not finite"
        )
    return g.contiguous()
