"""Fixed-size per-step adapter metadata and stacked slot weights: the layout the Triton ops read.

Pure torch. Each part is preallocated at its maximum size so a step allocates nothing on the device:

`StepMeta` — one per step, shared by every layer (vLLM's "punica metadata"):
    token_slots [max_tokens]   int32   adapter slot of each packed row, −1 = base model (no work)
    seg_starts  [max_segments] int32   first row of segment i  } prefill ("segment") form: rows
    seg_lens    [max_segments] int32   row count (0 allowed)   } [start, start+len) all use seg_slots[i]
    seg_slots   [max_segments] int32   slot of segment i       }
    num_segments [1]           int32   how many entries of seg_* are live (a device scalar)
    num_tokens, num_groups, max_seg_len  host ints; only size the launch grids
Rows past num_tokens have slot −1, segments past num_segments are never read, so every kernel
launch can use the maximum grid and stay correct.

`StepBuffers` — owns the StepMeta plus the per-projection-family token→slot rows and the kernels' fp32 scratch.

`SlotBuffers` — one per AdaptedLinear, vLLM's stacked layout, `copy_` to load an adapter:
    A_buf [n_slices, max_slots, max_rank, in]       A of projection j for slot s = A_buf[j, s, :r]
    B_buf [max_slots, total_out, max_rank]          B of projection j = B_buf[s, out_start_j : +out_j, :r]
    slot_ranks  [n_slices, max_slots] int32         r of (projection, slot); 0 = not adapted (no work)
    slot_scales [n_slices, max_slots] float32       scale / divisor
    bias_buf [max_slots, total_out] (optional)      lora_bias · scale, 0 where absent
    g_buf    [max_slots, total_out] (optional)      DoRA g = m/‖W0+sBA‖_row, exactly 1.0 for plain LoRA
Everything beyond a slot's rank is zero, and the kernels loop only to `slot_ranks[j, s]`, so an r=8
adapter costs r=8 even next to an r=64 one. Rank and scale are stored per (projection, slot), not
per slot: AdaLoRA's allocated ranks and PEFT's rank_pattern/alpha_pattern differ between q/k/v of
one adapter. B is stacked along the packed output dimension, so the q/k/v (gate/up) projections of a
layer are slices of one launch (a grid axis over j, each with its own out_start/out size/rank/scale).

Worked example: slots [3, 3, −1, 5] as decodes, then a 4-token prefill of slot 3, groups
(3, 0, 2), (5, 3, 4), (3, 4, 8) give, with max_tokens=10, max_segments=4:
    token_slots = [3, 3, −1, 5, 3, 3, 3, 3, −1, −1]
    seg_starts = [0, 3, 4, 0], seg_lens = [2, 1, 4, 0], seg_slots = [3, 5, 3, −1], num_segments = [3]
    max_seg_len = 4

What a CUDA graph of the decode step needs, and where this code stands:
  done   — every device buffer a step touches is allocated before any step and only written in place
           (`StepBuffers`: StepMeta, the projection families' token→slot rows, both scratches; the slot buffers and
           RandLoRA/VeRA stacks are written at adapter load, between steps, which a replay picks up
           because the graph reads them by address); the kernels read num_segments on the device and
           never need a host read of a device value; decode-only steps use the token form, whose grid
           depends only on the token count.
  needed — launch the token form with the padded batch size (rows past num_tokens carry slot −1)
           and capture one graph per padded size, as vLLM does; launch the VeRA/RandLoRA kernels for
           every resident projection family rather than only the step's (one without tokens is all −1 and
           does no work), so the launch sequence does not depend on the adapter mix; make the model's
           own per-step inputs (token ids, positions, KV slot ids, the decode attention mask) fixed-size
           device buffers; and keep `StepBuffers.fill_*` and any scratch growth outside the replay.
  The segment form's grid depends on the longest segment, so prefill stays eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lora import LinearFactors, SliceFactors, lora_rows_ref

Group = tuple[int, int, int]  # (slot, start, end): rows [start, end) use `slot`


@dataclass(slots=True)
class StepMeta:
    token_slots: torch.Tensor  # [max_tokens] int32, −1 = base
    seg_starts: torch.Tensor  # [max_segments] int32
    seg_lens: torch.Tensor  # [max_segments] int32
    seg_slots: torch.Tensor  # [max_segments] int32
    num_segments: torch.Tensor  # [1] int32
    num_tokens: int = 0
    num_groups: int = 0  # host copy of num_segments: eager launches size their grids by it
    max_seg_len: int = 0

    @property
    def max_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @property
    def max_segments(self) -> int:
        return int(self.seg_starts.shape[0])


def alloc_step_meta(max_tokens: int, max_segments: int, device: torch.device | str = "cpu") -> StepMeta:
    i32 = dict(dtype=torch.int32, device=device)
    return StepMeta(
        torch.full((max_tokens,), -1, **i32),
        torch.zeros(max_segments, **i32),
        torch.zeros(max_segments, **i32),
        torch.full((max_segments,), -1, **i32),
        torch.zeros(1, **i32),
    )


def fill_step_meta(meta: StepMeta, groups: list[Group], num_tokens: int) -> StepMeta:
    """Writes one step's grouping into `meta` in place (host-built, then one `copy_` per buffer)."""
    if num_tokens > meta.max_tokens or len(groups) > meta.max_segments:
        raise ValueError(f"{num_tokens} tokens / {len(groups)} groups exceed {meta.max_tokens} / {meta.max_segments}")
    token_slots = torch.full((meta.max_tokens,), -1, dtype=torch.int32)
    starts, lens, slots = (torch.zeros(meta.max_segments, dtype=torch.int32) for _ in range(3))
    slots.fill_(-1)
    for i, (slot, start, end) in enumerate(groups):
        if not 0 <= start <= end <= num_tokens:
            raise ValueError(f"group {(slot, start, end)} outside [0, {num_tokens})")
        token_slots[start:end] = slot
        starts[i], lens[i], slots[i] = start, end - start, slot
    meta.token_slots.copy_(token_slots)
    meta.seg_starts.copy_(starts)
    meta.seg_lens.copy_(lens)
    meta.seg_slots.copy_(slots)
    meta.num_segments.fill_(len(groups))
    meta.num_tokens = num_tokens
    meta.num_groups = len(groups)
    meta.max_seg_len = max((end - start for _, start, end in groups), default=0)
    return meta


def build_step_meta(
    groups: list[Group],
    num_tokens: int,
    max_tokens: int | None = None,
    max_segments: int | None = None,
    device: torch.device | str = "cpu",
) -> StepMeta:
    meta = alloc_step_meta(max_tokens or max(num_tokens, 1), max_segments or max(len(groups), 1), device)
    return fill_step_meta(meta, groups, num_tokens)


class StepBuffers:
    """Every per-step buffer the Triton path writes or reads besides weights, allocated once and reused:
    the StepMeta, one token→slot row per VeRA/RandLoRA projection family of the step, the LoRA shrink
    scratch and the shared-bases scratch. They are sized at startup for the engine's token budget; a scratch grows
    (reallocates, counted in `allocations`) only when a loaded adapter needs a wider one, which is a
    load-time event, so a steady stream of steps allocates nothing on the device.

        projection_slots [max_projection_families, max_tokens] int32
                         row i: slot of each row for the step's i-th projection family, −1 elsewhere
        lora_h           [max_slices, max_tokens, max_rank] fp32    x Aᵀ per projection (LoRA shrink → expand)
        projection_h     [max_tokens, max_width] fp32              x A_lᵀ (VeRA), x Uᵀ or x V (RandLoRA)
    """

    def __init__(self, max_tokens: int, max_projection_families: int, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.max_tokens = max_tokens
        self.meta = alloc_step_meta(max_tokens, max_tokens, device)  # a group has ≥ 1 token
        self.projection_slots = torch.full((max_projection_families, max_tokens), -1, dtype=torch.int32, device=device)
        self.lora_h = torch.zeros(0, max_tokens, 0, dtype=torch.float32, device=device)
        self.projection_h = torch.zeros(max_tokens, 0, dtype=torch.float32, device=device)
        self.allocations = 0

    def fill_meta(self, groups: list[Group], num_tokens: int) -> StepMeta:
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed the step buffers' {self.max_tokens}")
        return fill_step_meta(self.meta, groups, num_tokens)

    def fill_projection_family(
        self, index: int, rows: slice | torch.Tensor, token_slots: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        """Row `index` of projection_slots for this step: [num_tokens] with the projection family's rows set to
        their slot."""
        out = self.projection_slots[index, :num_tokens]
        out.fill_(-1)
        out[rows if isinstance(rows, slice) else rows.to(self.device)] = token_slots.to(self.device, torch.int32)
        return out

    def lora_scratch(self, n_slices: int, max_rank: int) -> torch.Tensor:
        if self.lora_h.shape[0] < n_slices or self.lora_h.shape[2] < max_rank:
            self.lora_h = torch.zeros(
                max(n_slices, self.lora_h.shape[0]),
                self.max_tokens,
                max(max_rank, self.lora_h.shape[2]),
                dtype=torch.float32,
                device=self.device,
            )
            self.allocations += 1
        return self.lora_h[:n_slices, :, :max_rank]

    def projection_scratch(self, width: int) -> torch.Tensor:
        if self.projection_h.shape[1] < width:
            self.projection_h = torch.zeros(self.max_tokens, width, dtype=torch.float32, device=self.device)
            self.allocations += 1
        return self.projection_h[:, :width]


@dataclass(slots=True)
class SlotBuffers:
    out_slices: list[tuple[int, int]]  # (out_start, out_features) per projection j
    A_buf: torch.Tensor  # [n_slices, max_slots, max_rank, in]
    B_buf: torch.Tensor  # [max_slots, total_out, max_rank]
    slot_ranks: torch.Tensor  # [n_slices, max_slots] int32
    slot_scales: torch.Tensor  # [n_slices, max_slots] float32
    out_starts: torch.Tensor  # [n_slices] int32 (device copy of out_slices)
    out_sizes: torch.Tensor  # [n_slices] int32
    bias_buf: torch.Tensor | None = None  # [max_slots, total_out]
    g_buf: torch.Tensor | None = None  # [max_slots, total_out], 1.0 where not DoRA

    @property
    def max_rank(self) -> int:
        return int(self.A_buf.shape[2])


def alloc_slot_buffers(
    in_features: int,
    out_slices: list[tuple[int, int]],
    max_slots: int,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    with_bias: bool = False,
    with_dora: bool = False,
) -> SlotBuffers:
    total_out = max(start + size for start, size in out_slices)
    n = len(out_slices)
    i32 = dict(dtype=torch.int32, device=device)
    return SlotBuffers(
        out_slices=list(out_slices),
        A_buf=torch.zeros(n, max_slots, max_rank, in_features, dtype=dtype, device=device),
        B_buf=torch.zeros(max_slots, total_out, max_rank, dtype=dtype, device=device),
        slot_ranks=torch.zeros(n, max_slots, **i32),
        slot_scales=torch.zeros(n, max_slots, dtype=torch.float32, device=device),
        out_starts=torch.tensor([s for s, _ in out_slices], **i32),
        out_sizes=torch.tensor([o for _, o in out_slices], **i32),
        bias_buf=torch.zeros(max_slots, total_out, dtype=dtype, device=device) if with_bias else None,
        g_buf=torch.ones(max_slots, total_out, dtype=dtype, device=device) if with_dora else None,
    )


def clear_slot(bufs: SlotBuffers, slot: int) -> None:
    bufs.A_buf[:, slot].zero_()
    bufs.B_buf[slot].zero_()
    bufs.slot_ranks[:, slot] = 0
    bufs.slot_scales[:, slot] = 0.0
    if bufs.bias_buf is not None:
        bufs.bias_buf[slot].zero_()
    if bufs.g_buf is not None:
        bufs.g_buf[slot].fill_(1.0)


def write_slot(bufs: SlotBuffers, slot: int, factors: LinearFactors | None) -> None:
    """Loads one adapter's LoRA-family factors for this layer into `slot` (copy_, zero padding)."""
    clear_slot(bufs, slot)
    if factors is None:
        return
    for s in factors.slices:
        j = bufs.out_slices.index((s.out_start, s.out_features))
        r, cols = s.rank, slice(s.out_start, s.out_start + s.out_features)
        if r > bufs.max_rank:
            raise ValueError(f"rank {r} > max_rank {bufs.max_rank}")
        bufs.A_buf[j, slot, :r].copy_(s.A)
        bufs.B_buf[slot, cols, :r].copy_(s.Bt.T)
        bufs.slot_ranks[j, slot] = r
        bufs.slot_scales[j, slot] = s.scale / s.divisor
        if s.bias is not None:
            if bufs.bias_buf is None:
                raise ValueError("slot buffers were allocated without bias")
            bufs.bias_buf[slot, cols].copy_(s.bias)
        if s.output_scale is not None:
            if bufs.g_buf is None:
                raise ValueError("slot buffers were allocated without DoRA scales")
            bufs.g_buf[slot, cols].copy_(s.output_scale)


def lora_shrink_expand_ref(
    x: torch.Tensor, y: torch.Tensor, meta: StepMeta, bufs: SlotBuffers, base_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of the slot-buffer ops, in place on y [T, total_out]: for each live segment i,
    `kernels.lora.lora_rows_ref` (the one torch statement of the LoRA-family op) on its rows, with the
    factors of slot s = seg_slots[i] read back from the buffers as views: per projection j with
    r = slot_ranks[j, s] > 0, A = A_buf[j, s, :r], Bᵀ = B_buf[s, cols_j, :r]ᵀ, scale = slot_scales[j, s],
    bias = bias_buf[s, cols_j] and g = g_buf[s, cols_j] when the buffers have those planes (g ≡ 1 rows run
    DoRA's form with g = 1, as the kernel's epilogue does).
    """
    starts, lens, slots = (t.tolist() for t in (meta.seg_starts, meta.seg_lens, meta.seg_slots))
    for i in range(int(meta.num_segments.item())):
        slot, rows = slots[i], slice(starts[i], starts[i] + lens[i])
        if slot < 0 or lens[i] == 0:
            continue
        lora_rows_ref(x[rows], y[rows], base_bias, slot_factors(bufs, slot))
    return y


def slot_factors(bufs: SlotBuffers, slot: int) -> LinearFactors:
    """The factors held in `slot` of one layer's buffers, as views (what `write_slot` wrote, scale / divisor
    folded into the scale)."""
    pieces = []
    for j, (out_start, out_f) in enumerate(bufs.out_slices):
        r = int(bufs.slot_ranks[j, slot])
        if r == 0:
            continue
        cols = slice(out_start, out_start + out_f)
        pieces.append(
            SliceFactors(
                out_start,
                out_f,
                bufs.A_buf[j, slot, :r],
                bufs.B_buf[slot, cols, :r].T,
                float(bufs.slot_scales[j, slot]),
                bias=None if bufs.bias_buf is None else bufs.bias_buf[slot, cols],
                output_scale=None if bufs.g_buf is None else bufs.g_buf[slot, cols],
            )
        )
    return LinearFactors(pieces)
