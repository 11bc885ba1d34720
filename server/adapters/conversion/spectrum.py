"""Singular value decompositions of layer updates, in float64 (docs/conversion.md §2).

Three ways, chosen per layer:

* **factored** (`ΔW = B A` with inner dim k < min(out, in): LoRA family, VeRA): thin QRs of B and Aᵀ
  leave a k x k core whose SVD is ΔW's (docs/adapters.md §11). All singular values, exact.
* **exact**: LAPACK SVD of the dense [out, in] matrix. All singular values.
* **randomized** (dense layers with min(out, in) above `SvdConfig.exact_max_dim`, when at most
  `keep` directions can be kept): Halko–Martinsson–Tropp range finder with power iterations. It
  returns `keep + 1 + oversample` leading singular values, approximately. Its truncation `U_r U_rᵀ ΔW`
  is an orthogonal projection of ΔW, so `‖ΔW − ΔW_r‖_F² = ‖ΔW‖_F² − Σ_{i≤r} σ̃_i²` holds exactly
  for the factors it gives (the Frobenius errors reported are those of the adapter produced); the
  spectral error it reports is the estimate σ̃_{r+1}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .updates import LayerUpdate


@dataclass(frozen=True, slots=True)
class SvdConfig:
    exact_max_dim: int = 2048  # dense layers up to this min(out, in) get the exact SVD
    oversample: int = 16
    power_iters: int = 2
    seed: int = 0  # the randomized sketch is seeded per layer: the same layer gives the same numbers
    # An error or energy target needs every layer's σ before any rank is known: singular vectors of
    # all layers (up to their caps) are kept from that first pass when they fit in this much memory,
    # else each layer is decomposed a second time once its rank is chosen.
    keep_vectors_mb: float = 1024.0


DEFAULT_SVD = SvdConfig()


@dataclass(slots=True)
class Spectrum:
    """Leading singular values of one update (all of them when `complete`) and, when asked for,
    the singular vectors that go with them."""

    sigma: torch.Tensor  # [n] float64, descending
    total_sq: float  # ‖ΔW‖_F², exact
    complete: bool  # sigma holds every nonzero singular value
    method: str  # "factored" | "exact" | "randomized"
    shape: tuple[int, int]
    U: torch.Tensor | None = None  # [out, n]
    Vh: torch.Tensor | None = None  # [n, in]

    @property
    def sigma_1(self) -> float:
        return float(self.sigma[0]) if len(self.sigma) else 0.0

    def sigma_after(self, r: int) -> float:
        """σ_{r+1}: the spectral error of the best rank-r approximation (0 past the rank)."""
        return float(self.sigma[r]) if r < len(self.sigma) else 0.0

    def tail_sq(self, r: int) -> float:
        """‖ΔW − ΔW_r‖_F² = Σ_{i>r} σ_i² (from ‖ΔW‖_F² minus what is kept when sigma is partial)."""
        if self.complete:
            return float((self.sigma[r:] ** 2).sum())
        return max(self.total_sq - float((self.sigma[:r] ** 2).sum()), 0.0)

    @property
    def numerical_rank(self) -> int:
        """Singular values above LAPACK's rank tolerance σ_1 · max(out, in) · ε (float64); the rest are
        rounding noise of a rank-deficient update, and keeping them would only add parameters."""
        tol = self.sigma_1 * max(self.shape) * torch.finfo(torch.float64).eps
        return int((self.sigma > tol).sum())

    def trimmed(self, k: int) -> Spectrum:
        """The same spectrum with only the first k singular vectors kept (all the σ's)."""
        U = None if self.U is None else self.U[:, :k].clone()
        Vh = None if self.Vh is None else self.Vh[:k].clone()
        return Spectrum(self.sigma, self.total_sq, self.complete, self.method, self.shape, U, Vh)

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, r], A [r, in]) with B A = U_r Σ_r V_rᵀ, √σ on each side (balanced magnitudes)."""
        if self.U is None or self.Vh is None:
            raise ValueError("this spectrum was computed without singular vectors")
        root = self.sigma[:r].sqrt()
        return self.U[:, :r] * root, root[:, None] * self.Vh[:r]


def _randomized(M: torch.Tensor, n: int, cfg: SvdConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-n approximate SVD of M (Halko, Martinsson & Tropp 2011, Alg. 4.4): U [m, n], S [n], Vh [n, k]."""
    g = torch.Generator().manual_seed(cfg.seed)
    omega = torch.randn(M.shape[1], n, dtype=M.dtype, generator=g)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(cfg.power_iters):  # re-orthonormalised each half step, for the small σ's accuracy
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ Ub, S, Vh


@torch.no_grad()
def decompose(update: LayerUpdate, keep: int, vectors: bool, cfg: SvdConfig = DEFAULT_SVD) -> Spectrum:
    """The spectrum of `update`, enough to keep up to `keep` directions (and to know σ_{keep+1})."""
    shape = (update.out_features, update.in_features)
    k = update.inner_dim
    if k is not None and k < min(shape):
        QB, RB = torch.linalg.qr(update.B)
        QA, RA = torch.linalg.qr(update.A.T)
        Uc, S, Vch = torch.linalg.svd(RB @ RA.T)
        U, Vh = (QB @ Uc, Vch @ QA.T) if vectors else (None, None)
        return Spectrum(S, float((S**2).sum()), True, "factored", shape, U, Vh)
    M = update.matrix()
    n = keep + 1 + cfg.oversample
    if min(shape) > cfg.exact_max_dim and 2 * n <= min(shape):
        U, S, Vh = _randomized(M, n, cfg)
        total = float(torch.linalg.vector_norm(M) ** 2)
        return Spectrum(S, total, False, "randomized", shape, U if vectors else None, Vh if vectors else None)
    if vectors:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    else:
        U, S, Vh = None, torch.linalg.svdvals(M), None
    return Spectrum(S, float((S**2).sum()), True, "exact", shape, U, Vh)
