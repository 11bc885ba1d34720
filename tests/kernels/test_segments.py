"""The slot-buffer layout and its torch reference (pure torch, no Triton)."""

from __future__ import annotations

import pytest
import torch

from kernels.lora import lora_rows_ref
from kernels.segments import alloc_step_meta, build_step_meta, fill_step_meta, lora_shrink_expand_ref, write_slot
from tests.kernels.helpers import adapter, slot_buffers


def test_worked_example_from_the_docstring():
    meta = build_step_meta([(3, 0, 2), (5, 3, 4), (3, 4, 8)], 8, max_tokens=10, max_segments=4)
    assert meta.token_slots.tolist() == [3, 3, -1, 5, 3, 3, 3, 3, -1, -1]
    assert meta.seg_starts.tolist() == [0, 3, 4, 0]
    assert meta.seg_lens.tolist() == [2, 1, 4, 0]
    assert meta.seg_slots.tolist() == [3, 5, 3, -1]
    assert meta.num_segments.tolist() == [3] and meta.max_seg_len == 4
    assert all(t.dtype == torch.int32 for t in (meta.token_slots, meta.seg_starts, meta.seg_lens, meta.seg_slots))


def test_refill_keeps_buffers_and_rejects_overflow():
    meta = alloc_step_meta(6, 2)
    ptrs = [meta.token_slots.data_ptr(), meta.seg_starts.data_ptr()]
    fill_step_meta(meta, [(1, 0, 6)], 6)
    fill_step_meta(meta, [(2, 1, 2)], 3)  # a smaller step: stale rows must go back to −1
    assert meta.token_slots.tolist() == [-1, 2, -1, -1, -1, -1]
    assert [meta.token_slots.data_ptr(), meta.seg_starts.data_ptr()] == ptrs  # copy_, never reallocated
    with pytest.raises(ValueError):
        fill_step_meta(meta, [(0, 0, 1), (0, 1, 2), (0, 2, 3)], 3)
    with pytest.raises(ValueError):
        fill_step_meta(meta, [(0, 0, 7)], 7)


def test_write_slot_pads_with_zeros_and_clears_the_previous_adapter():
    gen = torch.Generator().manual_seed(0)
    out_slices = [(0, 8), (8, 4)]
    big, small = adapter(out_slices, 6, 5, gen), adapter(out_slices, 6, 2, gen, only=[1])
    bufs = slot_buffers(6, out_slices, {1: big}, max_slots=3, max_rank=5)
    write_slot(bufs, 1, small)
    assert bufs.slot_ranks[:, 1].tolist() == [0, 2]
    assert torch.equal(bufs.A_buf[1, 1, :2], small.slices[0].A) and not bufs.A_buf[1, 1, 2:].any()
    assert not bufs.A_buf[0, 1].any() and not bufs.B_buf[1, :8].any()
    assert torch.equal(bufs.B_buf[1, 8:, :2], small.slices[0].Bt.T)


# rank {1, 8, 13, 64}; in/out {64, 576, 97}; base rows, empty group, LoRA/DoRA/bias/divisor, projections skipped.
CASES = [
    dict(in_f=64, out_slices=[(0, 64)], ranks=[8], groups=[(0, 0, 5)], T=5),
    dict(
        in_f=97,
        out_slices=[(0, 64), (64, 33), (97, 33)],
        ranks=[1, 13, 64],
        groups=[(0, 0, 2), (2, 3, 7), (1, 7, 7), (1, 8, 11)],
        T=12,
        dora=True,
        bias=True,
    ),
    dict(in_f=576, out_slices=[(0, 97), (97, 576)], ranks=[13, 8], groups=[(1, 0, 1)], T=1, divisor=9.00001),
]


@pytest.mark.parametrize("case", CASES, ids=["one-adapter", "qkv-mixed-dora-bias", "single-token-adalora"])
def test_slot_reference_equals_lora_rows_ref_per_group(case):
    gen = torch.Generator().manual_seed(1)
    in_f, out_slices, T = case["in_f"], case["out_slices"], case["T"]
    adapters = {}
    for slot, rank in enumerate(case["ranks"]):
        kw = dict(
            dora=case.get("dora", False) and slot == 1,
            bias=case.get("bias", False) and slot != 1,
            divisor=case.get("divisor", 1.0),
            scale=[0.5, 0.3, 2.0][slot % 3],
        )
        only = [slot % len(out_slices)] if slot == 2 else None  # slot 2 adapts one projection only
        adapters[slot] = adapter(out_slices, in_f, rank, gen, only=only, **kw)
    bufs = slot_buffers(in_f, out_slices, adapters, max_slots=4, max_rank=64)
    total = max(s + o for s, o in out_slices)
    x, y0 = torch.randn(T, in_f, generator=gen), torch.randn(T, total, generator=gen)
    b0 = torch.randn(total, generator=gen)
    expected = y0.clone()
    for slot, start, end in case["groups"]:
        lora_rows_ref(x[start:end], expected[start:end], b0, adapters[slot])
    got = lora_shrink_expand_ref(x, y0.clone(), build_step_meta(case["groups"], T, max_segments=6), bufs, b0)
    assert (expected - y0).abs().max() > 0.1  # the adapters do something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
