"""Plain data types shared by the parser, the store and the server.

The canonical form of the LoRA family (LoRA, rsLoRA, AdaLoRA, DoRA) is a per-layer low-rank pair
(A, B) and a scale, so the serving kernels see ``y += scale * (x A^T) B^T``; DoRA additionally
carries a per-output-row multiplier ``output_scale`` (see ``LayerFactors``).
VeRA and RandLoRA keep only their trained vectors per layer (``VeraFactors`` / ``RandLoraFactors``)
plus a ``ProjectionFamily`` naming the shared random projections (docs/adapters.md §3, §4, §6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .projections import (
    ProjectionFamily,
    randlora_layer_bases,
    randlora_scaled_bases,
    shared_projections,
    vera_layer_bases,
)


@dataclass(frozen=True, slots=True)
class TargetLayer:
    """One adaptable ``nn.Linear`` of the base model."""

    path: str  # module path inside the base model, e.g. "model.layers.0.self_attn.q_proj"
    out_features: int
    in_features: int
    has_bias: bool


@dataclass(slots=True)
class BaseModelSpec:
    """What the server tells the parser about its loaded base model."""

    layers: dict[str, TargetLayer]  # all adaptable layers, keyed by path
    # path -> base weight W0 [out, in] (any float dtype). DoRA needs it (its row norms depend on W0)
    # and the LoRA-family size check needs ||W0||_F (``weight_norm``), so it is a callable: the
    # server need not materialise copies.
    weight: Callable[[str], torch.Tensor]
    max_rank: int = 256
    max_bytes: int = 512 * 2**20
    # False when parsing a stored version whose bytes match the digest taken when they were uploaded
    # (and validated): the value checks (NaN/Inf, update size) are skipped, shapes are still checked.
    check_values: bool = True
    # path -> ||W0||_F, filled on first use: the base weights are frozen, so each is computed once.
    _weight_norms: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def weight_norm(self, path: str) -> float:
        """Frobenius norm of the base weight of ``path`` (cached)."""
        norm = self._weight_norms.get(path)
        if norm is None:
            with torch.no_grad():
                norm = float(torch.linalg.vector_norm(self.weight(path).detach().float()))
            self._weight_norms[path] = norm
        return norm


@dataclass(slots=True)
class LayerFactors:
    """Canonical low-rank delta of one layer.

    LoRA family:  y = x W0^T + b0 + ((x A^T) B^T) * scale / divisor + bias
    DoRA:         y = output_scale * (x W0^T + scale * (x A^T) B^T) + b0
                  (``output_scale`` g = m / ||W0 + s*B0@A0||_row, computed once at parse time from the
                  server's base weight; PEFT recomputes it every forward from the same numbers.)
    """

    A: torch.Tensor  # [r, in] float32
    B: torch.Tensor  # [out, r] float32, unscaled: PEFT multiplies by the scale after the product,
    #                  and doing the same keeps our logits bit-identical to PEFT's
    scale: float = 1.0
    divisor: float = 1.0  # AdaLoRA: PEFT multiplies by alpha, then divides by (init_r + 1e-5)
    bias: torch.Tensor | None = None  # [out] float32 (lora_bias * scale) or None
    output_scale: torch.Tensor | None = None  # DoRA only, [out] float32

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def nbytes(self) -> int:
        tensors = (self.A, self.B, self.bias, self.output_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(slots=True)
class VeraFactors:
    """VeRA layer (docs/adapters.md §3.3): y = y0 + λ_b ⊙ ((λ_d ⊙ (x A_lᵀ)) B_lᵀ).

    A_l = vera_A[:, :in], B_l = vera_B[:out, :] (see ``projections.vera_layer_bases``). No scale.
    """

    lambda_d: torch.Tensor  # [r] float32
    lambda_b: torch.Tensor  # [out] float32
    # λ_b gives `out`, but nothing in the trained vectors gives `in`, which the A slice needs.
    in_features: int

    @property
    def rank(self) -> int:
        return int(self.lambda_d.shape[0])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.lambda_d, self.lambda_b)


@dataclass(slots=True)
class RandLoraFactors:
    """RandLoRA layer (docs/adapters.md §4.3), scale = randlora_alpha / r.

    U = (λ[:, :, None] * A_l * Γ[None]).flatten(0, 1), V = B_l.flatten(1) (``projections.randlora_scaled_bases``);
    in <= out: y = y0 + ((x Uᵀ) Vᵀ) * scale;  in > out: y = y0 + ((x V) U) * scale.
    """

    lam: torch.Tensor  # [r, nb_l] float32 (randlora_lambda)
    gamma: torch.Tensor  # [nb_l, min_l] float32 (randlora_gamma)
    scale: float
    # min_l alone does not say which side is the input (the two cases use U and V differently).
    out_features: int
    in_features: int

    @property
    def rank(self) -> int:
        return int(self.lam.shape[0])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.lam, self.gamma)


AnyFactors = LayerFactors | VeraFactors | RandLoraFactors
Projections = tuple[torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class ParsedAdapter:
    kind: str  # "lora" | "rslora" | "adalora" | "dora" | "vera" | "randlora"
    # key = TargetLayer.path; rank-0 AdaLoRA layers dropped. LayerFactors for the LoRA family,
    # VeraFactors / RandLoraFactors for "vera" / "randlora".
    layers: dict[str, AnyFactors]
    target_modules: list[str]  # sorted short names present, e.g. ["k_proj", "q_proj"]
    family: ProjectionFamily | None = None  # VeRA / RandLoRA only
    # Only for a stored family (family.stored_digest set): the uploaded float32 (A, B), shaped as
    # PEFT's model-level buffers. A seed family regenerates them from ``family``.
    projections: Projections | None = None

    @property
    def projection(self) -> str | None:
        """ "seed" (regenerated from projection_prng_key), "stored" (own projections), None (LoRA family)."""
        if self.family is None:
            return None
        return "seed" if self.projections is None else "stored"

    def resolve_projections(self, projections: Projections | None = None) -> Projections:
        """The (A, B) this adapter uses: the argument, else the stored ones, else regenerated (cached)."""
        if projections is not None:
            return projections
        if self.projections is not None:
            return self.projections
        if self.family is None:
            raise ValueError(f"{self.kind} adapter has no shared projections")
        return shared_projections(self.family)

    def delta_weight(self, path: str, projections: Projections | None = None) -> torch.Tensor:
        """Dense ΔW [out, in] float32 (scale included), docs/adapters.md §7.

        For LoRA / rsLoRA / AdaLoRA / VeRA / RandLoRA this is exactly PEFT's ``get_delta_weight``:
        W = W0 + ΔW. For DoRA it is only the *directional* update: the merged weight is NOT W0 + ΔW
        but ``output_scale[:, None] * (W0 + ΔW)``; use :meth:`merged_weight` for that.
        ``projections`` only matters for VeRA / RandLoRA (default: :meth:`resolve_projections`).
        """
        f = self.layers[path]
        if isinstance(f, LayerFactors):
            return (f.B @ f.A) * f.scale / f.divisor
        A, B = self.resolve_projections(projections)
        A, B = A.float(), B.float()
        if isinstance(f, VeraFactors):
            A_l, B_l = vera_layer_bases(A, B, int(f.lambda_b.shape[0]), f.in_features)
            return (f.lambda_b[:, None] * B_l) @ (f.lambda_d[:, None] * A_l)
        A_l, B_l = randlora_layer_bases(A, B, f.out_features, f.in_features, f.rank)
        U, V = randlora_scaled_bases(f.lam, f.gamma, A_l, B_l)
        # PEFT's get_scaled_bases/get_delta_weight, expression for expression: same rounding.
        upd_b, upd_a = (U, V) if f.in_features <= f.out_features else (V.T, U.T)
        return (upd_b.T @ upd_a.T).T * f.scale

    def merged_weight(
        self, path: str, base_weight: torch.Tensor, projections: Projections | None = None
    ) -> torch.Tensor:
        """Weight that replaces W0 when merging, in float32.

        LoRA family, VeRA, RandLoRA: W0 + ΔW.  DoRA: g[:, None] * (W0 + ΔW).  A lora_bias is not
        included here; see :meth:`merged_bias`.
        """
        f = self.layers[path]
        merged = base_weight.float() + self.delta_weight(path, projections)
        if isinstance(f, LayerFactors) and f.output_scale is not None:
            merged = f.output_scale.view(-1, 1) * merged
        return merged

    def merged_bias(self, path: str, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        """Bias after merging (base bias + lora_bias*scale); DoRA, VeRA, RandLoRA leave it unchanged."""
        f = self.layers[path]
        bias = f.bias if isinstance(f, LayerFactors) else None
        if bias is None:
            return None if base_bias is None else base_bias.float()
        return bias.clone() if base_bias is None else base_bias.float() + bias

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.layers.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Per-adapter float32 bytes: factors, plus stored projections (a seed family's are shared)."""
        own = _nbytes(*self.projections) if self.projections is not None else 0
        return sum(f.nbytes for f in self.layers.values()) + own
