"""Triton twins of the shared-bases ops (`kernels.shared_bases`: `vera_family_ref`, `randlora_family_ref`).

Every adapter of a VeRA/RandLoRA family shares the family's random bases, so each op is one dense
product with a shared basis over all of the step's tokens, with the per-token (per-slot) factors
gathered inside the kernel instead of materialised per adapter. `token_slots` [T] int32 gives each
row's slot, −1 for rows outside the family (no work, rows untouched).

Two generic gathered products (λ strides may be 0 to broadcast a per-slot scalar or a constant):
    gathered_shrink: h[t, :R]      = λ[s, :R] ⊙ round(x[t] Wᵀ)          W [R, K]   (h fp32 scratch)
    gathered_expand: y[t, cols]   += λ[s, cols] ⊙ round(h[t] Wᵀ)        W [N, R]
VeRA (`vera_apply`, docs/adapters.md §3): h = gathered_shrink(x, A_l) without λ, once per packed layer (A_l
depends only on the input size), then one launch over every projection j of the layer:
    y[t, cols_j] += λ_b[s, cols_j] ⊙ round(round(λ_d[j, s] ⊙ h[t]) B[:out_j]ᵀ)
RandLoRA (docs/adapters.md §4.3) never builds an adapter's U = λ ⊙ A ⊙ Γ, which is [r·nb, min] per projection
(as large as the base weight for square layers); its kernels read the trained λ [r, nb] and Γ [nb, min]
of each token's slot from a `RandLoraStack` and the family's A [r, 1, min]:
    in ≤ out: h[t, i·nb+b] = λ[s,i,b] · Σ_c x[t,c] Γ[s,b,c] A[i,c]          (= x Uᵀ, `randlora_gamma_shrink`)
              y[t]        += scale[s] · round(h[t] Vᵀ)                       (gathered_expand, W = V)
    in > out: p[t]         = round(x[t] V)                                   (gathered_shrink, W = Vᵀ, λ ≡ 1)
              y[t, c]     += scale[s] · Σ_b Γ[s,b,c] Σ_i p[t, i·nb+b] λ[s,i,b] A[i,c]   (= p U, `randlora_gamma_expand`)
The index k = i·nb + b of h/p pairs with column k of V = B_l.flatten(1) exactly as PEFT pairs them.
`round` is a rounding to the input dtype, where the torch reference rounds its matmul outputs; the
rest accumulates in fp32. Under RandLoRA the factored sum differs from x Uᵀ in fp32 rounding only, but
that is not nothing: the same factored form in torch lands 1.0e-4 from PEFT's fp32 logits on SmolLM2
(r32 on q/v), while PEFT's op order gives 0.0, and PEFT's own fp32 result is 2e-4 from an fp64 one. So
the CPU path keeps PEFT's order (U per slot), and on a GPU, where U per slot would cost a base model's
worth of memory per adapter, the factored kernels trade that last 1e-4 for memory.

Worked example: a family with slots 2 and 5 holding rows 0–1 and 4 of a 6-row step:
    token_slots = [2, 2, −1, −1, 5, −1]; rows 2, 3, 5 are read as zeros and never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.shared_bases import RandLoraStack, VeraStack
from kernels.triton_common import INTERPRETED, mma


# ---------------------------------------------------------------------------------------- generic
@triton.jit
def _row_tile(token_slots, pid_m, T, BLOCK_M: tl.constexpr):
    """Rows of tile pid_m, their slots (−1 past T), and which of them belong to the family (slot ≥ 0)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(token_slots + offs_m, mask=offs_m < T, other=-1)
    return offs_m, slots, (offs_m < T) & (slots >= 0)


@triton.jit
def _gathered_shrink_kernel(
    x_ptr,
    w_ptr,
    lam_ptr,
    h_ptr,
    token_slots,
    T,
    K,
    R,
    sx_t,
    sx_k,
    sw_r,
    sw_k,
    sl_s,
    sl_r,
    sh_t,
    sh_r,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LAM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """h[t, r] = λ[slot(t), r] · round(x[t] Wᵀ)[r] (λ ≡ 1 without HAS_LAM): one shared product over a row
    tile, gather-scale fused."""
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    offs_m, slots, live = _row_tile(token_slots, pid_m, T, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(
            x_ptr + offs_m[:, None] * sx_t + offs_k[None, :] * sx_k, mask=live[:, None] & mask_k[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + offs_r[None, :] * sw_r + offs_k[:, None] * sw_k, mask=mask_r[None, :] & mask_k[:, None], other=0.0
        )
        acc += mma(xt, wt, UPCAST)
    acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # x Wᵀ in the input dtype, like the reference
    mask = live[:, None] & mask_r[None, :]
    if HAS_LAM:
        acc *= tl.load(lam_ptr + slots[:, None] * sl_s + offs_r[None, :] * sl_r, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs_m[:, None] * sh_t + offs_r[None, :] * sh_r, acc, mask=mask)


@triton.jit
def _gathered_expand_kernel(
    h_ptr,
    w_ptr,
    lam_ptr,
    y_ptr,
    token_slots,
    T,
    N,
    R,
    sh_t,
    sh_r,
    sw_n,
    sw_r,
    sl_s,
    sl_n,
    sy_t,
    sy_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y[t, n] += λ[slot(t), n] · round(h[t] Wᵀ)[n] for rows with slot ≥ 0."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m, slots, live = _row_tile(token_slots, pid_m, T, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        ht = tl.load(
            h_ptr + offs_m[:, None] * sh_t + offs_r[None, :] * sh_r, mask=live[:, None] & mask_r[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + offs_n[None, :] * sw_n + offs_r[:, None] * sw_r, mask=mask_n[None, :] & mask_r[:, None], other=0.0
        )
        acc += mma(ht.to(wt.dtype), wt, UPCAST)
    acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)  # h Wᵀ in the input dtype
    mask = live[:, None] & mask_n[None, :]
    lam = tl.load(lam_ptr + slots[:, None] * sl_s + offs_n[None, :] * sl_n, mask=mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * sy_t + offs_n[None, :] * sy_n
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + lam * acc).to(y_ptr.dtype.element_ty), mask=mask)


def _scratch(h: torch.Tensor | None, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    if h is None:
        return torch.zeros(rows, cols, dtype=torch.float32, device=device)
    if h.shape[0] < rows or h.shape[1] < cols or h.dtype != torch.float32:
        raise ValueError(f"scratch {tuple(h.shape)} {h.dtype} is smaller than [{rows}, {cols}] float32")
    return h


def gathered_shrink(
    x: torch.Tensor,
    W: torch.Tensor,
    lam: torch.Tensor | None,
    token_slots: torch.Tensor,
    h: torch.Tensor | None = None,
    block_m: int = 16,
    block_r: int = 16,
    block_k: int = 64,
) -> torch.Tensor:
    """h[t, :R] = λ[token_slots[t]] ⊙ round(x[t] Wᵀ); x [T, K], W [R, K] (any strides), lam [max_slots, R]
    (strides may be 0) or None for λ ≡ 1, token_slots [T] int32; h [≥T, ≥R] fp32 scratch (allocated when None).
    Rows with slot −1 are left untouched."""
    T, K = x.shape
    R = W.shape[0]
    h = _scratch(h, T, R, x.device)
    if T:
        grid = (triton.cdiv(T, block_m), triton.cdiv(R, block_r))
        lam_arg, lam_strides = (h, (0, 0)) if lam is None else (lam, lam.stride())  # h: an unread placeholder
        _gathered_shrink_kernel[grid](
            x,
            W,
            lam_arg,
            h,
            token_slots,
            T,
            K,
            R,
            x.stride(0),
            x.stride(1),
            W.stride(0),
            W.stride(1),
            *lam_strides,
            h.stride(0),
            h.stride(1),
            BLOCK_M=block_m,
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            HAS_LAM=lam is not None,
            UPCAST=INTERPRETED,
        )
    return h


def gathered_expand(
    h: torch.Tensor,
    y: torch.Tensor,
    W: torch.Tensor,
    lam: torch.Tensor,
    token_slots: torch.Tensor,
    out_start: int = 0,
    block_m: int = 16,
    block_n: int = 64,
    block_r: int = 16,
) -> torch.Tensor:
    """y[t, out_start:out_start+N] += λ[token_slots[t]] ⊙ round(h[t, :R] Wᵀ); W [N, R], lam [max_slots, N]
    (strides may be 0); only rows with slot ≥ 0 are written."""
    T = y.shape[0]
    N, R = W.shape
    ys = y[:, out_start : out_start + N]
    if T:
        grid = (triton.cdiv(T, block_m), triton.cdiv(N, block_n))
        _gathered_expand_kernel[grid](
            h,
            W,
            lam,
            ys,
            token_slots,
            T,
            N,
            R,
            h.stride(0),
            h.stride(1),
            W.stride(0),
            W.stride(1),
            lam.stride(0),
            lam.stride(1),
            ys.stride(0),
            ys.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            UPCAST=INTERPRETED,
        )
    return y


# ---------------------------------------------------------------------------------------- VeRA
@triton.jit
def _vera_expand_kernel(
    h_ptr,
    b_ptr,
    lam_d_ptr,
    lam_b_ptr,
    y_ptr,
    token_slots,
    out_starts,
    out_sizes,
    active,
    T,
    R,
    sh_t,
    sh_r,
    sb_n,
    sb_r,
    sd_j,
    sd_s,
    sd_r,
    sl_s,
    sl_n,
    sy_t,
    sy_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y[t, c0_j + n] += λ_b[s, c0_j + n] · round(Σ_r round(λ_d[j, s, r] · h[t, r]) · B[n, r]), program (m, n, j):
    every projection j of a packed layer in one launch (B_l of j is B[:out_j])."""
    pid_m, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if tl.load(active + j) == 0:
        return
    out_size = tl.load(out_sizes + j)
    if pid_n * BLOCK_N >= out_size:
        return
    offs_m, slots, live = _row_tile(token_slots, pid_m, T, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_size
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        mask_mr = live[:, None] & mask_r[None, :]
        ht = tl.load(h_ptr + offs_m[:, None] * sh_t + offs_r[None, :] * sh_r, mask=mask_mr, other=0.0)
        lam_d = tl.load(
            lam_d_ptr + j * sd_j + slots[:, None] * sd_s + offs_r[None, :] * sd_r, mask=mask_mr, other=0.0
        ).to(tl.float32)
        bt = tl.load(
            b_ptr + offs_n[None, :] * sb_n + offs_r[:, None] * sb_r, mask=mask_n[None, :] & mask_r[:, None], other=0.0
        )  # [BR, BN] = B_lᵀ
        acc += mma((lam_d * ht).to(bt.dtype), bt, UPCAST)  # λ_d ⊙ h in B's dtype
    acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)  # u in the input dtype
    cols = tl.load(out_starts + j) + offs_n
    mask = live[:, None] & mask_n[None, :]
    lam_b = tl.load(lam_b_ptr + slots[:, None] * sl_s + cols[None, :] * sl_n, mask=mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * sy_t + cols[None, :] * sy_n
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + lam_b * acc).to(y_ptr.dtype.element_ty), mask=mask)


def vera_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    A_l: torch.Tensor,
    B: torch.Tensor,
    stack: VeraStack,
    token_slots: torch.Tensor,
    h: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 64,
    block_r: int = 16,
) -> torch.Tensor:
    """`vera_family_ref` for the rows with token_slots ≥ 0, all projections of the layer in one expand launch:
    h = round(x A_lᵀ) once (shared by every projection and adapter), then per projection j
    y[t, cols_j] += λ_b[s, cols_j] ⊙ ((λ_d[j, s] ⊙ h[t]) B[:out_j]ᵀ). x [T, in], y [T, total_out], A_l [r, in],
    B [≥ max out_j, r]; h: fp32 scratch of at least [T, r] (allocated when None)."""
    T, R = x.shape[0], A_l.shape[0]
    h = gathered_shrink(x, A_l, None, token_slots, h)
    if T:
        grid = (triton.cdiv(T, block_m), triton.cdiv(stack.max_out, block_n), len(stack.out_slices))
        _vera_expand_kernel[grid](
            h,
            B,
            stack.lambda_d,
            stack.lambda_b,
            y,
            token_slots,
            stack.out_starts,
            stack.out_sizes,
            stack.active,
            T,
            R,
            h.stride(0),
            h.stride(1),
            B.stride(0),
            B.stride(1),
            *stack.lambda_d.stride(),
            *stack.lambda_b.stride(),
            y.stride(0),
            y.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            UPCAST=INTERPRETED,
        )
    return y


# ---------------------------------------------------------------------------------------- RandLoRA
@triton.jit
def _randlora_gamma_shrink_kernel(
    x_ptr,
    a_ptr,
    lam_ptr,
    gam_ptr,
    h_ptr,
    token_slots,
    R,
    NB,
    MIN,
    sx_t,
    sx_c,
    sa_i,
    sa_c,
    sl_s,
    sl_i,
    sl_b,
    sg_s,
    sg_b,
    sg_c,
    sh_t,
    sh_k,
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """h[t, i·nb+b] = round(λ[s,i,b] · Σ_c (x[t,c] Γ[s,b,c]) A[i,c]), program (t, b tile), s = slot(t)."""
    t, pid_b = tl.program_id(0), tl.program_id(1)
    slot = tl.load(token_slots + t)
    if slot < 0:
        return
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < NB
    for i0 in range(0, R, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < R
        acc = tl.zeros((BLOCK_B, BLOCK_I), dtype=tl.float32)
        for c0 in range(0, MIN, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < MIN
            xv = tl.load(x_ptr + t * sx_t + offs_c * sx_c, mask=mask_c, other=0.0).to(tl.float32)
            gam = tl.load(
                gam_ptr + slot * sg_s + offs_b[:, None] * sg_b + offs_c[None, :] * sg_c,
                mask=mask_b[:, None] & mask_c[None, :],
                other=0.0,
            ).to(tl.float32)  # [BB, BC]
            at = tl.load(
                a_ptr + offs_i[None, :] * sa_i + offs_c[:, None] * sa_c,
                mask=mask_i[None, :] & mask_c[:, None],
                other=0.0,
            ).to(tl.float32)  # [BC, BI] = Aᵀ
            acc += tl.dot(gam * xv[None, :], at, input_precision="ieee")
        mask = mask_b[:, None] & mask_i[None, :]
        lam = tl.load(lam_ptr + slot * sl_s + offs_i[None, :] * sl_i + offs_b[:, None] * sl_b, mask=mask, other=0.0).to(
            tl.float32
        )
        out = (lam * acc).to(x_ptr.dtype.element_ty).to(tl.float32)  # x Uᵀ in the input dtype
        tl.store(h_ptr + t * sh_t + (offs_i[None, :] * NB + offs_b[:, None]) * sh_k, out, mask=mask)


@triton.jit
def _randlora_gamma_expand_kernel(
    p_ptr,
    a_ptr,
    lam_ptr,
    gam_ptr,
    scale_ptr,
    y_ptr,
    token_slots,
    R,
    NB,
    MIN,
    sp_t,
    sp_k,
    sa_i,
    sa_c,
    sl_s,
    sl_i,
    sl_b,
    sg_s,
    sg_b,
    sg_c,
    sy_t,
    sy_n,
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y[t, c] += scale[s] · round(Σ_b Γ[s,b,c] Σ_i p[t, i·nb+b] λ[s,i,b] A[i,c]), program (t, c tile)."""
    t, pid_c = tl.program_id(0), tl.program_id(1)
    slot = tl.load(token_slots + t)
    if slot < 0:
        return
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < MIN
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < NB
        w = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for i0 in range(0, R, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < R
            mask_bi = mask_b[:, None] & mask_i[None, :]
            p = tl.load(p_ptr + t * sp_t + (offs_i[None, :] * NB + offs_b[:, None]) * sp_k, mask=mask_bi, other=0.0)
            lam = tl.load(
                lam_ptr + slot * sl_s + offs_i[None, :] * sl_i + offs_b[:, None] * sl_b, mask=mask_bi, other=0.0
            ).to(tl.float32)
            a = tl.load(
                a_ptr + offs_i[:, None] * sa_i + offs_c[None, :] * sa_c,
                mask=mask_i[:, None] & mask_c[None, :],
                other=0.0,
            ).to(tl.float32)  # [BI, BC]
            w += tl.dot(p.to(tl.float32) * lam, a, input_precision="ieee")  # [BB, BC]
        gam = tl.load(
            gam_ptr + slot * sg_s + offs_b[:, None] * sg_b + offs_c[None, :] * sg_c,
            mask=mask_b[:, None] & mask_c[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(gam * w, axis=0)
    delta = acc.to(y_ptr.dtype.element_ty).to(tl.float32) * tl.load(scale_ptr + slot)  # p U in the input dtype
    y_ptrs = y_ptr + t * sy_t + offs_c * sy_n
    y = tl.load(y_ptrs, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask_c)


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def randlora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    A_l: torch.Tensor,
    V: torch.Tensor,
    stack: RandLoraStack,
    token_slots: torch.Tensor,
    out_start: int = 0,
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    """`randlora_family_ref` for the rows with token_slots ≥ 0, each with its slot's λ, Γ and scale from
    `stack`. x [T, in]; y [T, ≥ out_start + out]; A_l [r, 1, min] and V [max, nb·r] the family's layer
    slices (PEFT's); h: fp32 scratch of at least [T, nb·r] (allocated when None)."""
    T, in_f = x.shape
    r, nb, min_l = stack.lam.shape[1], stack.lam.shape[2], stack.gamma.shape[2]
    out_f = V.shape[0] if stack.in_le_out else min_l
    lam, gam = stack.lam, stack.gamma
    a_strides = (A_l.stride(0), A_l.stride(2))
    lg_strides = (*lam.stride(), *gam.stride())
    h = _scratch(h, T, nb * r, x.device)
    if not T:
        return y
    block_b, block_i, block_c = _block(nb), _block(r, hi=32), 64
    if stack.in_le_out:  # h = x Uᵀ (factored), then the shared V product with the per-slot scale
        _randlora_gamma_shrink_kernel[(T, triton.cdiv(nb, block_b))](
            x,
            A_l,
            lam,
            gam,
            h,
            token_slots,
            r,
            nb,
            min_l,
            x.stride(0),
            x.stride(1),
            *a_strides,
            *lg_strides,
            h.stride(0),
            h.stride(1),
            BLOCK_B=block_b,
            BLOCK_I=block_i,
            BLOCK_C=block_c,
        )
        scales = stack.scales.unsqueeze(1).expand(-1, out_f)  # a per-slot scalar, stride 0 over columns
        return gathered_expand(h, y, V, scales, token_slots, out_start)
    p = gathered_shrink(x, V.T, None, token_slots, h)  # p = x V, shared by the family
    ys = y[:, out_start : out_start + out_f]
    _randlora_gamma_expand_kernel[(T, triton.cdiv(min_l, block_c))](
        p,
        A_l,
        lam,
        gam,
        stack.scales,
        ys,
        token_slots,
        r,
        nb,
        min_l,
        p.stride(0),
        p.stride(1),
        *a_strides,
        *lg_strides,
        ys.stride(0),
        ys.stride(1),
        BLOCK_B=block_b,
        BLOCK_I=block_i,
        BLOCK_C=block_c,
    )
    return y
