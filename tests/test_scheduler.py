"""Pure-Python engine pieces: slot allocator, scheduler policy, incremental detokenizer, sampler filters."""

from __future__ import annotations

from pathlib import Path

import torch

from server.adapters.slot_table import SlotTable
from server.engine.block_pool import BlockPool
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.request import Request, SamplingParams
from server.engine.sampler import _filter_top_k_top_p
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence


class CharDecoder:
    """Token i decodes to chr(i); 0xFFFD mimics a half-finished UTF-8 sequence."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def _seq(rid: str, prompt_len: int, max_tokens: int = 4, stop: tuple[str, ...] = ()) -> Sequence:
    request = Request(
        rid, list(range(100, 100 + prompt_len)), SamplingParams(max_tokens=max_tokens, stop=stop), emit=lambda e: None
    )
    return Sequence(
        request,
        list(request.prompt_ids),
        IncrementalDetokenizer(CharDecoder(), stop),
        eos_token_ids=frozenset({2}),
        max_len=64,
    )


class _AllResident:
    """A host tier where every adapter is already in memory."""

    def resident(self, version: str) -> bool:
        return True

    def load_error(self, version: str) -> str | None:
        return None


def scheduler_for(max_num_seqs: int, max_batched_tokens: int, num_blocks: int = 64, **kwargs) -> Scheduler:
    """A scheduler over a pool of 4-position blocks whose adapters are all resident."""
    blocks = BlockPool(num_blocks, block_size=4)
    return Scheduler(blocks, max_num_seqs, max_batched_tokens, SlotTable(2), _AllResident(), **kwargs)


def test_scheduler_admits_under_token_budget_and_chunks_long_prompts():
    scheduler = scheduler_for(max_num_seqs=4, max_batched_tokens=10)
    long, short = _seq("long", 25), _seq("short", 3)
    scheduler.add(long)
    scheduler.add(short)
    batch = scheduler.schedule()
    assert [(s.request_id, n) for s, n in batch.prefills] == [("long", 10)]
    assert batch.sampled() == []  # no logits until the prompt is complete
    scheduler.postprocess(batch, [])
    batch = scheduler.schedule()
    assert [(s.request_id, n) for s, n in batch.prefills] == [("long", 10)]
    scheduler.postprocess(batch, [])
    batch = scheduler.schedule()  # last 5 of long, then short fits in the remaining budget
    assert [(s.request_id, n) for s, n in batch.prefills] == [("long", 5), ("short", 3)]
    assert batch.sampled() == [long, short]
    scheduler.postprocess(batch, [65, 66])
    batch = scheduler.schedule()
    assert batch.decodes == [long, short] and not batch.prefills


def test_scheduler_waits_when_full_and_frees_on_finish():
    scheduler = scheduler_for(max_num_seqs=1, max_batched_tokens=100)
    first, second = _seq("a", 2, max_tokens=1), _seq("b", 2)
    scheduler.add(first)
    scheduler.add(second)
    batch = scheduler.schedule()
    assert [s.request_id for s, _ in batch.prefills] == ["a"]
    finished = scheduler.postprocess(batch, [70])
    assert finished == [first] and first.finish_reason == "length"
    assert scheduler.blocks.num_used == 0
    assert [s.request_id for s, _ in scheduler.schedule().prefills] == ["b"]


def test_abort_releases_waiting_and_running():
    scheduler = scheduler_for(max_num_seqs=1, max_batched_tokens=100)
    a, b = _seq("a", 2), _seq("b", 2)
    scheduler.add(a)
    scheduler.add(b)
    scheduler.postprocess(scheduler.schedule(), [70])
    assert scheduler.abort("b") is b and b.finish_reason == "abort"
    assert scheduler.abort("a") is a and scheduler.blocks.num_used == 0
    assert scheduler.abort("missing") is None
    assert not scheduler.has_work()


def test_eos_finishes_with_stop_unless_ignored():
    seq = _seq("e", 2, max_tokens=10)
    seq.append(2)
    assert seq.finish_reason == "stop"


def test_detokenizer_holds_back_partial_stop_and_cuts_it():
    detok = IncrementalDetokenizer(CharDecoder(), stop=("END",))
    out = []
    for ch in "abcEN":
        detok.add(ord(ch))
        out.append(detok.take_delta(final=False))
    assert "".join(out) == "abc"  # "EN" might become "END": held back
    detok.add(ord("D"))
    assert detok.stopped
    assert detok.take_delta(final=True) == ""
    assert detok.text == "abc"


def test_detokenizer_waits_for_complete_characters():
    detok = IncrementalDetokenizer(CharDecoder(), stop=())
    detok.add(0xFFFD)
    assert detok.take_delta(final=False) == ""
    detok.add(ord("x"))
    assert detok.take_delta(final=False).endswith("x")


def test_top_k_and_top_p_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(_filter_top_k_top_p(logits, 2, 1.0)[2:]).all()
    # probabilities ≈ [0.644, 0.237, 0.087, 0.032]: the nucleus keeps the token that crosses top_p
    assert (~torch.isinf(_filter_top_k_top_p(logits, 0, 0.5))).tolist() == [True, False, False, False]
    assert (~torch.isinf(_filter_top_k_top_p(logits, 0, 0.8))).tolist() == [True, True, False, False]


def test_kernels_package_is_ours():
    import kernels

    assert Path(kernels.__file__).resolve().is_relative_to(Path(__file__).resolve().parent.parent)
