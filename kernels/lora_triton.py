"""Triton twins of the slot-buffer LoRA ops (`kernels.segments.lora_shrink_expand_ref` is the reference).

Layouts are `kernels.segments` (StepMeta, SlotBuffers). The ops are vLLM's shrink/expand:
    shrink: h[j, t, :r] = x[t] A_buf[j, s, :r]ᵀ      (h: fp32 scratch [n_slices, max_tokens, max_rank])
    expand: y[t, cols_j] (+)= epilogue((h[j, t, :r] → B dtype) B_buf[s, cols_j, :r]ᵀ)
with s = slot of t, r = slot_ranks[j, s] read inside the kernel (the rank loop stops there; s = −1
or r = 0 is no work). Two launch forms of each:
    segment form (prefill): grid (segments, row tiles [× col tiles], n_slices), tl.dot tiles
    token form   (decode):  grid (max_tokens [, col tiles], n_slices), one token per program
Products accumulate in fp32 whatever the input dtype; h is rounded to B's dtype before the expand
product, like the torch reference's bf16 `x Aᵀ`. Tile sizes are constexpr, odd sizes are masked.
Launch helpers take the scratch buffer from the caller so a CUDA graph can capture them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.segments import SlotBuffers, StepMeta
from kernels.triton_common import INTERPRETED, mma


# ---------------------------------------------------------------------------------------- shrink
@triton.jit
def _lora_shrink_seg_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    seg_starts,
    seg_lens,
    seg_slots,
    num_segments,
    ranks_ptr,
    K,
    sx_t,
    sx_k,
    sa_j,
    sa_s,
    sa_r,
    sa_k,
    sh_j,
    sh_t,
    sh_r,
    sr_j,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """h[j, rows, :r] = x[rows] A_buf[j, s, :r]ᵀ for row tile m of segment i (program (i, m, j))."""
    seg, pid_m, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if seg >= tl.load(num_segments):
        return
    slot = tl.load(seg_slots + seg)
    length = tl.load(seg_lens + seg)
    if slot < 0:
        return
    if pid_m * BLOCK_M >= length:
        return
    rank = tl.load(ranks_ptr + j * sr_j + slot)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    rows = tl.load(seg_starts + seg) + offs_m
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xt = tl.load(
                x_ptr + rows[:, None] * sx_t + offs_k[None, :] * sx_k, mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )  # [BM, BK]
            at = tl.load(
                a_ptr + j * sa_j + slot * sa_s + offs_r[None, :] * sa_r + offs_k[:, None] * sa_k,
                mask=mask_r[None, :] & mask_k[:, None],
                other=0.0,
            )  # [BK, BR] = Aᵀ
            acc += mma(xt, at, UPCAST)
        tl.store(
            h_ptr + j * sh_j + rows[:, None] * sh_t + offs_r[None, :] * sh_r,
            acc,
            mask=mask_m[:, None] & mask_r[None, :],
        )


@triton.jit
def _lora_shrink_tok_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    token_slots,
    ranks_ptr,
    K,
    sx_t,
    sx_k,
    sa_j,
    sa_s,
    sa_r,
    sa_k,
    sh_j,
    sh_t,
    sh_r,
    sr_j,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h[j, t, :r] = x[t] A_buf[j, token_slots[t], :r]ᵀ (program (t, j); a GEMV per token)."""
    t, j = tl.program_id(0), tl.program_id(1)
    slot = tl.load(token_slots + t)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + j * sr_j + slot)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xv = tl.load(x_ptr + t * sx_t + offs_k * sx_k, mask=mask_k, other=0.0).to(tl.float32)
            a = tl.load(
                a_ptr + j * sa_j + slot * sa_s + offs_r[:, None] * sa_r + offs_k[None, :] * sa_k,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            ).to(tl.float32)  # [BR, BK]
            acc += tl.sum(a * xv[None, :], axis=1)
        tl.store(h_ptr + j * sh_j + t * sh_t + offs_r * sh_r, acc, mask=mask_r)


# ---------------------------------------------------------------------------------------- expand
@triton.jit
def _expand_epilogue(
    acc,
    rows,
    cols,
    mask,
    slot,
    scale,
    y_ptr,
    sy_t,
    sy_n,
    bias_ptr,
    g_ptr,
    sbg_s,
    b0_ptr,
    ACCUMULATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DORA: tl.constexpr,
    HAS_BASE_BIAS: tl.constexpr,
):
    """y (+)= (g − 1) ⊙ (y − b0) + (g ⊙ acc) · scale + bias   (g ≡ 1, bias ≡ 0 when absent)."""
    y_ptrs = y_ptr + rows * sy_t + cols * sy_n
    if ACCUMULATE:
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DORA:
            g = tl.load(g_ptr + slot * sbg_s + cols, mask=mask, other=1.0).to(tl.float32)
            base = y
            if HAS_BASE_BIAS:
                base = y - tl.load(b0_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            out = y + ((g - 1.0) * base + (g * acc) * scale)
        else:
            out = y + acc * scale
    else:
        out = acc * scale
    if HAS_BIAS:
        out += tl.load(bias_ptr + slot * sbg_s + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_expand_seg_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    seg_starts,
    seg_lens,
    seg_slots,
    num_segments,
    ranks_ptr,
    scales_ptr,
    out_starts,
    out_sizes,
    bias_ptr,
    g_ptr,
    b0_ptr,
    n_col_tiles,
    sh_j,
    sh_t,
    sh_r,
    sb_s,
    sb_n,
    sb_r,
    sy_t,
    sy_n,
    sr_j,
    sbg_s,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DORA: tl.constexpr,
    HAS_BASE_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y[rows, cols_j] (+)= epilogue(h[j, rows, :r] B_buf[s, cols_j, :r]ᵀ), program (i, m·n, j)."""
    seg, pid, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if seg >= tl.load(num_segments):
        return
    pid_m = pid // n_col_tiles
    pid_n = pid % n_col_tiles
    slot = tl.load(seg_slots + seg)
    length = tl.load(seg_lens + seg)
    out_size = tl.load(out_sizes + j)
    if slot < 0:
        return
    if pid_m * BLOCK_M >= length:
        return
    if pid_n * BLOCK_N >= out_size:
        return
    rank = tl.load(ranks_ptr + j * sr_j + slot)
    if rank == 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    rows = tl.load(seg_starts + seg) + offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_size
    cols = tl.load(out_starts + j) + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        ht = tl.load(
            h_ptr + j * sh_j + rows[:, None] * sh_t + offs_r[None, :] * sh_r,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )  # [BM, BR] fp32
        bt = tl.load(
            b_ptr + slot * sb_s + cols[None, :] * sb_n + offs_r[:, None] * sb_r,
            mask=mask_n[None, :] & mask_r[:, None],
            other=0.0,
        )  # [BR, BN] = Bᵀ
        acc += mma(ht.to(bt.dtype), bt, UPCAST)
    scale = tl.load(scales_ptr + j * sr_j + slot)
    _expand_epilogue(
        acc,
        rows[:, None],
        cols[None, :],
        mask_m[:, None] & mask_n[None, :],
        slot,
        scale,
        y_ptr,
        sy_t,
        sy_n,
        bias_ptr,
        g_ptr,
        sbg_s,
        b0_ptr,
        ACCUMULATE,
        HAS_BIAS,
        HAS_DORA,
        HAS_BASE_BIAS,
    )


@triton.jit
def _lora_expand_tok_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    token_slots,
    ranks_ptr,
    scales_ptr,
    out_starts,
    out_sizes,
    bias_ptr,
    g_ptr,
    b0_ptr,
    sh_j,
    sh_t,
    sh_r,
    sb_s,
    sb_n,
    sb_r,
    sy_t,
    sy_n,
    sr_j,
    sbg_s,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DORA: tl.constexpr,
    HAS_BASE_BIAS: tl.constexpr,
):
    """y[t, cols_j] (+)= epilogue(h[j, t, :r] B_buf[s, cols_j, :r]ᵀ), s = token_slots[t], program (t, n, j)."""
    t, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(token_slots + t)
    if slot < 0:
        return
    out_size = tl.load(out_sizes + j)
    if pid_n * BLOCK_N >= out_size:
        return
    rank = tl.load(ranks_ptr + j * sr_j + slot)
    if rank == 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_size
    cols = tl.load(out_starts + j) + offs_n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        b = tl.load(
            b_ptr + slot * sb_s + cols[:, None] * sb_n + offs_r[None, :] * sb_r,
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        )  # [BN, BR]
        hv = tl.load(h_ptr + j * sh_j + t * sh_t + offs_r * sh_r, mask=mask_r, other=0.0)
        hv = hv.to(b.dtype).to(tl.float32)  # round like the reference's x Aᵀ
        acc += tl.sum(b.to(tl.float32) * hv[None, :], axis=1)
    scale = tl.load(scales_ptr + j * sr_j + slot)
    _expand_epilogue(
        acc,
        t,
        cols,
        mask_n,
        slot,
        scale,
        y_ptr,
        sy_t,
        sy_n,
        bias_ptr,
        g_ptr,
        sbg_s,
        b0_ptr,
        ACCUMULATE,
        HAS_BIAS,
        HAS_DORA,
        HAS_BASE_BIAS,
    )


# ---------------------------------------------------------------------------------------- launch
def alloc_shrink_buffer(bufs: SlotBuffers, max_tokens: int) -> torch.Tensor:
    """The fp32 scratch h [n_slices, max_tokens, max_rank] (allocate once; capture-safe)."""
    return torch.zeros(len(bufs.out_slices), max_tokens, bufs.max_rank, dtype=torch.float32, device=bufs.A_buf.device)


def lora_shrink(
    x: torch.Tensor,
    bufs: SlotBuffers,
    meta: StepMeta,
    h: torch.Tensor,
    form: str = "segments",
    block_m: int = 16,
    block_r: int = 16,
    block_k: int = 64,
) -> torch.Tensor:
    """h[j, t, :r] = x[t] A_buf[j, slot(t), :r]ᵀ for every adapted (token, projection); h [n_slices, max_tokens,
    max_rank] fp32. form = "segments" (meta.seg_*, prefill) or "tokens" (meta.token_slots, decode).
    Rows of base tokens and ranks ≥ r of h are left untouched (the expand never reads them)."""
    A, n_slices = bufs.A_buf, len(bufs.out_slices)
    K = x.shape[1]
    strides = (K, x.stride(0), x.stride(1), *A.stride(), *h.stride(), bufs.slot_ranks.stride(0))
    if form == "segments":
        if meta.max_seg_len == 0:
            return h
        grid = (meta.num_groups, triton.cdiv(meta.max_seg_len, block_m), n_slices)
        _lora_shrink_seg_kernel[grid](
            x,
            A,
            h,
            meta.seg_starts,
            meta.seg_lens,
            meta.seg_slots,
            meta.num_segments,
            bufs.slot_ranks,
            *strides,
            BLOCK_M=block_m,
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            UPCAST=INTERPRETED,
        )
    elif form == "tokens":
        grid = (meta.num_tokens, n_slices)  # meta.max_tokens under a CUDA graph: padded rows have slot −1
        if meta.num_tokens:
            _lora_shrink_tok_kernel[grid](
                x, A, h, meta.token_slots, bufs.slot_ranks, *strides, BLOCK_R=block_r, BLOCK_K=block_k
            )
    else:
        raise ValueError(f"unknown form {form!r}")
    return h


def lora_expand(
    h: torch.Tensor,
    y: torch.Tensor,
    bufs: SlotBuffers,
    meta: StepMeta,
    form: str = "segments",
    accumulate: bool = True,
    base_bias: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 64,
    block_r: int = 16,
) -> torch.Tensor:
    """In place on y [T, total_out], for each adapted (token t, projection j), s = slot(t), cols_j its columns:
        L = h[j, t, :r] B_buf[s, cols_j, :r]ᵀ
        accumulate:  y[t, cols_j] += (g − 1) ⊙ (y − b0) + (g ⊙ L) · scale[j, s] + bias[s, cols_j]
        otherwise:   y[t, cols_j]  = L · scale[j, s] + bias[s, cols_j]      (only adapted entries written)
    g = bufs.g_buf (DoRA, 1 elsewhere) and bias = bufs.bias_buf when allocated; b0 = the layer's base bias.
    Mirrors `lora_shrink_expand_ref` (shrink + expand)."""
    B, n_slices = bufs.B_buf, len(bufs.out_slices)
    has_dora = bufs.g_buf is not None
    if has_dora and not accumulate:
        raise ValueError("the DoRA epilogue needs the base output: accumulate=True")
    dummy = bufs.slot_scales
    bias = bufs.bias_buf if bufs.bias_buf is not None else dummy
    g = bufs.g_buf if has_dora else dummy
    sbg = (bufs.bias_buf if bufs.bias_buf is not None else bufs.g_buf if has_dora else B[:, :, 0]).stride(0)
    flags = dict(
        ACCUMULATE=accumulate,
        HAS_BIAS=bufs.bias_buf is not None,
        HAS_DORA=has_dora,
        HAS_BASE_BIAS=has_dora and base_bias is not None,
    )
    b0 = base_bias if base_bias is not None else dummy
    n_col_tiles = triton.cdiv(int(max(o for _, o in bufs.out_slices)), block_n)
    strides = (*h.stride(), *B.stride(), y.stride(0), y.stride(1), bufs.slot_ranks.stride(0), sbg)
    common = (bufs.slot_ranks, bufs.slot_scales, bufs.out_starts, bufs.out_sizes, bias, g, b0)
    if form == "segments":
        if meta.max_seg_len == 0:
            return y
        grid = (meta.num_groups, triton.cdiv(meta.max_seg_len, block_m) * n_col_tiles, n_slices)
        _lora_expand_seg_kernel[grid](
            h,
            B,
            y,
            meta.seg_starts,
            meta.seg_lens,
            meta.seg_slots,
            meta.num_segments,
            *common,
            n_col_tiles,
            *strides,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            UPCAST=INTERPRETED,
            **flags,
        )
    elif form == "tokens":
        if meta.num_tokens:
            grid = (meta.num_tokens, n_col_tiles, n_slices)
            _lora_expand_tok_kernel[grid](
                h, B, y, meta.token_slots, *common, *strides, BLOCK_N=block_n, BLOCK_R=block_r, **flags
            )
    else:
        raise ValueError(f"unknown form {form!r}")
    return y


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    bufs: SlotBuffers,
    meta: StepMeta,
    h: torch.Tensor,
    form: str = "segments",
    base_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """shrink + expand (accumulate): the Triton twin of `lora_shrink_expand_ref(x, y, meta, bufs, base_bias)`."""
    lora_shrink(x, bufs, meta, h, form)
    return lora_expand(h, y, bufs, meta, form, accumulate=True, base_bias=base_bias)
