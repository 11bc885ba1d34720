"""Shared random projections of VeRA and RandLoRA, regenerated bit-exactly as PEFT 0.21.2 does.

docs/adapters.md §6: one CPU ``torch.Generator`` seeded with ``projection_prng_key``; the shapes come
from the element-wise max (out, in) over the adapter's own adapted layers. VeRA draws fp32
kaiming-uniform ``vera_A (r, I)`` then ``vera_B (O, r)``. Dense RandLoRA draws bf16 kaiming pieces
(A, then ``nb`` B pieces concatenated) and divides by ``std()`` in bf16; sparse / very_sparse draw
fp32 uniforms and ternarize. Every draw order, dtype and Python-float bound below is PEFT's: a
different order or dtype gives different (still "random") numbers and silently wrong outputs.

All dtypes are explicit so a server that changes torch's default dtype gets the same numbers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
from dataclasses import dataclass

import torch

KINDS = ("vera", "randlora")
SPARSITIES = ("dense", "sparse", "very_sparse")
BASIS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class ProjectionFamily:
    """Everything the shared projections depend on (docs/adapters.md §10).

    Adapters with equal families (and ``stored_digest is None``) use bit-identical projections,
    so a server can keep one resident copy per family.
    """

    kind: str  # "vera" | "randlora"
    seed: int  # projection_prng_key
    r: int
    max_out: int  # element-wise max over the adapter's adapted layers, nn.Linear (out, in)
    max_in: int
    sparsity: str  # "dense" | "sparse" | "very_sparse" (always "dense" for VeRA)
    basis_dtype: str  # "float32" for VeRA and sparse RandLoRA, "bfloat16" for dense RandLoRA
    # Set when the adapter brings projections that differ from the regenerated ones: the family is
    # then that adapter's own (first 16 hex of sha256 of the float32 bytes of A then B).
    stored_digest: str | None = None

    def key(self) -> str:
        """Stable identifier, safe as a dict key and a file name."""
        k = f"{self.kind}-k{self.seed}-r{self.r}-o{self.max_out}-i{self.max_in}-{self.sparsity}-{self.basis_dtype}"
        return k if self.stored_digest is None else f"{k}-stored{self.stored_digest}"

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of PEFT's model-level buffers (A, B)."""
        if self.kind == "vera":
            return (self.r, self.max_in), (self.max_out, self.r)
        max_dim, min_dim = max(self.max_out, self.max_in), min(self.max_out, self.max_in)
        return (self.r, 1, min_dim), (max_dim, ceil_div_like_peft(min_dim, self.r), self.r)


def ceil_div_like_peft(a: int, b: int) -> int:
    """PEFT's ``num_bases``: float division, then int (+1 if not integral)."""
    n = a / b
    return int(n) if n.is_integer() else int(n) + 1


def projection_digest(A: torch.Tensor, B: torch.Tensor) -> str:
    """First 16 hex of sha256 over the float32 bytes of A, then B (identifies a stored family)."""
    h = hashlib.sha256()
    for t in (A, B):
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        # Raw bytes without numpy (not a runtime dependency); `t` stays alive during the read.
        h.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
    return h.hexdigest()[:16]


def _vera_kaiming(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    # vera/model.py::_kaiming_init: bound from Python floats, fan_in = shape[1] for a 2-D tensor.
    t = torch.empty(shape, dtype=torch.float32)
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=g)


def _randlora_dense(fam: ProjectionFamily, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = BASIS_DTYPES[fam.basis_dtype]
    (a_shape, b_shape) = fam.shapes()
    max_dim, nb = b_shape[0], b_shape[1]

    def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        with torch.no_grad():
            return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)

    A = kaiming(a_shape)  # drawn first
    B = torch.cat([kaiming((max_dim, 1, fam.r)) for _ in range(nb)], dim=1)  # nb pieces, in order
    # std and division in the basis dtype (bf16), as PEFT; upcast only afterwards.
    return (A / A.std()).to(torch.float32), (B / B.std()).to(torch.float32)


def _randlora_sparse(fam: ProjectionFamily, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a_shape, b_shape = fam.shapes()
    # very_sparse: sqrt(min(O, I)) (a float); sparse: the int 3. Same Python expressions as PEFT.
    s = math.sqrt(min(fam.max_out, fam.max_in)) if fam.sparsity == "very_sparse" else 3
    A = torch.rand(a_shape, generator=g, dtype=torch.float32)
    B = torch.rand(b_shape, generator=g, dtype=torch.float32)

    def ternarize(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(t.shape, dtype=torch.float32)
        out[t < 1 / (2 * s)] = -1
        out[t > 1 - 1 / (2 * s)] = 1
        return out

    As, Bs = ternarize(A), ternarize(B)
    return As / As.std(), Bs / Bs.std()


def generate_projections(family: ProjectionFamily) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh float32 (A, B) with the shapes of PEFT's model-level buffers.

    Dense RandLoRA returns its bf16 values upcast (exactly what PEFT holds on an fp32 base).
    """
    if family.stored_digest is not None:
        raise ValueError(f"projection family {family.key()} uses stored projections; they cannot be regenerated")
    if family.kind not in KINDS or family.sparsity not in SPARSITIES or family.basis_dtype not in BASIS_DTYPES:
        raise ValueError(f"invalid projection family {family!r}")
    g = torch.Generator(device="cpu").manual_seed(family.seed)  # always CPU, whatever the device
    if family.kind == "vera":
        A = _vera_kaiming((family.r, family.max_in), g)  # A first ...
        B = _vera_kaiming((family.max_out, family.r), g)  # ... then B, same generator
        return A, B
    if family.sparsity == "dense":
        return _randlora_dense(family, g)
    return _randlora_sparse(family, g)


@functools.lru_cache(maxsize=2)
def shared_projections(family: ProjectionFamily) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached :func:`generate_projections` for parsing and ``delta_weight``. Do not modify the result.

    Small cache on purpose: dense RandLoRA bases of a large model are as big as a weight matrix,
    and the server keeps its own resident copy per family.
    """
    return generate_projections(family)


def vera_layer_bases(A: torch.Tensor, B: torch.Tensor, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer views ``A_l = vera_A[:, :in]`` [r, in] and ``B_l = vera_B[:out, :]`` [out, r]."""
    return A[:, :in_f], B[:out_f, :]


def randlora_layer_bases(
    A: torch.Tensor, B: torch.Tensor, out_f: int, in_f: int, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``randlora_A[:, :nb_l, :min_l]`` (r, 1, min_l) and ``randlora_B[:max_l, :nb_l, :]`` (max_l, nb_l, r)."""
    min_l, max_l = min(out_f, in_f), max(out_f, in_f)
    nb = ceil_div_like_peft(min_l, r)
    return A[:, :nb, :min_l], B[:max_l, :nb, :]


def randlora_scaled_bases(
    lam: torch.Tensor, gamma: torch.Tensor, A_l: torch.Tensor, B_l: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` of docs/adapters.md §4.3: U (r*nb_l, min_l), V (max_l, nb_l*r), in PEFT's flatten orders.

    Row ``i*nb + b`` of U pairs with column ``b*r + i`` of V; that is PEFT's (odd) pairing and must
    not be "fixed". Layer output: in <= out: ``((x U^T) V^T) * s``; in > out: ``((x V) U) * s``.
    """
    U = (lam[:, :, None] * A_l * gamma[None]).flatten(end_dim=1)
    V = B_l.flatten(start_dim=1)
    return U, V
