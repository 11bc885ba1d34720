"""Engine behaviour on the real SmolLM2 model, driven step by step (float32)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import drive, make_request

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
]


def _chat_ids(runtime, text: str) -> list[int]:
    return runtime.tokenizer.encode_chat([{"role": "user", "content": text}])


def _hf_greedy(hf_model, ids: list[int], max_new: int) -> list[int]:
    out = hf_model.generate(
        torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=2, pad_token_id=2
    )
    return out[0, len(ids) :].tolist()


def _alone(runtime, ids: list[int], **params) -> list[int]:
    request, sink = make_request("alone", ids, **params)
    drive(runtime, {0: [request]})
    return sink.token_ids


def test_chat_template_ids_match_transformers(demo_runtime, demo_model_dir):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(demo_model_dir)
    for text in CHAT_PROMPTS:
        messages = [{"role": "user", "content": text}]
        expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert demo_runtime.tokenizer.encode_chat(messages) == list(expected)


@pytest.mark.parametrize("prompt", CHAT_PROMPTS)
def test_greedy_matches_transformers_generate(demo_runtime, hf_demo_model, prompt):
    ids = _chat_ids(demo_runtime, prompt)
    ours = _alone(demo_runtime, ids, max_tokens=24)
    theirs = _hf_greedy(hf_demo_model, ids, 24)
    assert ours == theirs[: len(ours)]
    assert len(ours) == len(theirs) or ours[-1] == 2  # we stop exactly where transformers hits EOS


def test_capital_of_france_is_paris(demo_runtime):
    request, sink = make_request("paris", _chat_ids(demo_runtime, "What is the capital of France?"), max_tokens=20)
    drive(demo_runtime, {0: [request]})
    assert "Paris" in sink.text
    assert sink.finish_reason == "stop"


def test_staggered_batch_equals_each_request_alone(demo_runtime):
    prompts = [
        "Tell me about the moon.",
        "Hi",
        "Explain photosynthesis in detail, step by step, please.",
        "What is 2+2?",
        "Name a famous painter and one of their works.",
    ]
    ids = [_chat_ids(demo_runtime, p) for p in prompts]
    alone = [_alone(demo_runtime, x, max_tokens=12, ignore_eos=True) for x in ids]
    schedule: dict[int, list] = {}
    sinks = []
    for i, x in enumerate(ids):  # admitted at steps 0, 0, 3, 5, 9: prefills meet running decodes
        request, sink = make_request(f"r{i}", x, max_tokens=12, ignore_eos=True)
        schedule.setdefault([0, 0, 3, 5, 9][i], []).append(request)
        sinks.append(sink)
    drive(demo_runtime, schedule)
    assert [s.token_ids for s in sinks] == alone


def test_long_prompt_is_prefilled_in_chunks_and_matches(demo_runtime):
    ids = _chat_ids(demo_runtime, "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 40)
    assert len(ids) > demo_runtime.engine.scheduler.max_batched_tokens
    expected = _alone(demo_runtime, ids, max_tokens=6, ignore_eos=True)
    short, sink_short = make_request("short", _chat_ids(demo_runtime, "Hi"), max_tokens=10, ignore_eos=True)
    long, sink_long = make_request("long", ids, max_tokens=6, ignore_eos=True)
    drive(demo_runtime, {0: [short], 2: [long]})
    assert sink_long.token_ids == expected
    assert sink_short.token_ids == _alone(demo_runtime, _chat_ids(demo_runtime, "Hi"), max_tokens=10, ignore_eos=True)


def test_seeded_sampling_is_reproducible_in_different_batches(demo_runtime):
    ids = _chat_ids(demo_runtime, "Write a short poem.")
    params = dict(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = _alone(demo_runtime, ids, **params)
    others = [
        make_request(f"o{i}", _chat_ids(demo_runtime, f"Story {i}"), max_tokens=20, temperature=1.0, ignore_eos=True)[0]
        for i in range(3)
    ]
    target, sink = make_request("seeded", ids, **params)
    drive(demo_runtime, {0: others[:2], 1: [target], 4: others[2:]})
    assert sink.token_ids == alone
    different_seed = _alone(demo_runtime, ids, **{**params, "seed": 99})
    assert different_seed != alone


def test_stop_string_ends_generation_and_is_not_in_text(demo_runtime):
    ids = _chat_ids(demo_runtime, "What is the capital of France?")
    full = make_request("full", ids, max_tokens=20)
    drive(demo_runtime, {0: [full[0]]})
    assert "Paris" in full[1].text
    stopped, sink = make_request("stop", ids, max_tokens=20, stop=("Paris",))
    drive(demo_runtime, {0: [stopped]})
    assert sink.finish_reason == "stop"
    assert sink.text == full[1].text.split("Paris")[0]
    assert "Paris" not in sink.text


def test_max_tokens_gives_length(demo_runtime):
    request, sink = make_request("len", _chat_ids(demo_runtime, "Tell a long story."), max_tokens=5, ignore_eos=True)
    drive(demo_runtime, {0: [request]})
    assert sink.finish_reason == "length"
    assert len(sink.token_ids) == 5
    assert sink.events[-1].completion_tokens == 5


def test_abort_frees_the_kv_blocks(demo_runtime):
    engine = demo_runtime.engine
    request, sink = make_request(
        "abort-me", _chat_ids(demo_runtime, "Count to one hundred."), max_tokens=200, ignore_eos=True
    )
    engine.admit(request)
    for _ in range(3):
        engine.step()
    assert engine.scheduler.blocks.num_used > 0
    engine.abort("abort-me")
    engine._drain_inbox(block=False)
    assert engine.scheduler.blocks.num_used == 0
    assert not engine.scheduler.has_work()
    assert sink.finish_reason == "abort"


def test_a_full_engine_makes_requests_wait_not_fail(demo_runtime):
    slots = demo_runtime.engine.scheduler.max_num_seqs
    requests = [
        make_request(f"w{i}", _chat_ids(demo_runtime, f"Say {i}"), max_tokens=4, ignore_eos=True)
        for i in range(slots + 3)
    ]
    engine = demo_runtime.engine
    for request, _ in requests:
        engine.admit(request)
    engine.step()
    assert len(engine.scheduler.running) == slots
    assert len(engine.scheduler.waiting) == 3
    drive(demo_runtime, {})
    assert all(sink.finish_reason == "length" and len(sink.token_ids) == 4 for _, sink in requests)
