"""Logprobs: the sampler's per-row numbers (batch-independent, only for rows that ask), and the
engine's against PEFT + transformers in float32 for a LoRA adapter, greedy and sampled."""

from __future__ import annotations

import pytest
import torch

from server.engine.request import SamplingParams
from server.engine.sampler import Sampler
from tests.conftest import drive, make_request
from tests.peft_helpers import ALL_TARGETS, load_peft, save_peft_adapter

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_sampler_logprobs_only_for_rows_that_ask():
    params = [SamplingParams(4), SamplingParams(4, logprobs=0), SamplingParams(4, temperature=0.7, seed=1, logprobs=3)]
    logits = _logits(3)
    tokens, logprobs = Sampler().sample(logits, [(f"r{i}", p) for i, p in enumerate(params)])
    assert logprobs[0] is None
    greedy = logprobs[1]
    assert greedy.token_id == tokens[1] == int(logits[1].argmax()) and greedy.top == ()
    assert greedy.logprob == pytest.approx(float(torch.log_softmax(logits[1], -1)[tokens[1]]), abs=1e-6)
    sampled = logprobs[2]
    reference = torch.log_softmax(logits[2] / 0.7, -1)  # after temperature, before any filtering
    assert sampled.token_id == tokens[2]
    assert sampled.logprob == pytest.approx(float(reference[tokens[2]]), abs=1e-6)
    best = torch.topk(reference, 3)
    assert [t for t, _ in sampled.top] == best.indices.tolist()
    assert [lp for _, lp in sampled.top] == pytest.approx(best.values.tolist(), abs=1e-6)


def test_sampler_logprobs_do_not_depend_on_the_batch():
    params = SamplingParams(4, temperature=0.9, top_k=10, seed=7, logprobs=5)
    logits = _logits(6, seed=1)
    _, [alone] = Sampler().sample(logits[2:3].clone(), [("me", params)])
    others = [(f"o{i}", SamplingParams(4, temperature=0.5, seed=i, logprobs=2)) for i in range(5)]
    _, batched = Sampler().sample(logits, [*others[:2], ("me", params), *others[2:]])
    assert batched[2] == alone  # bit-identical: computed from its own row only


def test_non_finite_row_gets_no_logprobs():
    logits = _logits(2)
    logits[0, 3] = float("nan")
    tokens, logprobs = Sampler().sample(
        logits, [("bad", SamplingParams(4, logprobs=2)), ("ok", SamplingParams(4, logprobs=2))]
    )
    assert tokens[0] is None and logprobs[0] is None and logprobs[1] is not None


@pytest.fixture(scope="module")
def lora(demo_runtime, hf_demo_model, tmp_path_factory):
    """A LoRA on every projection of SmolLM2, uploaded, and the PEFT model that is the oracle."""
    from peft import LoraConfig

    directory = tmp_path_factory.mktemp("logprobs-lora")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS)
    config_bytes, weights = save_peft_adapter(hf_demo_model, config, directory, seed=21)
    info = demo_runtime.adapters.upload("logprobs-lora", config_bytes, weights)
    return info, load_peft(hf_demo_model, directory)


def test_engine_logprobs_equal_peft_for_a_lora(demo_runtime, lora):
    """Greedy and seeded requests on the adapter (batched with a base-model one): every token's logprob
    and its top 5 equal PEFT's log-softmax of the same positions (after temperature) within 1e-4."""
    info, peft_model = lora
    prompt = demo_runtime.tokenizer.encode_chat([{"role": "user", "content": "Tell me about cats."}])
    cases = {"greedy": 0.0, "sampled": 0.7}
    requests = {}
    for name, temperature in cases.items():
        request, sink = make_request(f"lp-{name}", prompt, max_tokens=12, temperature=temperature, seed=3, logprobs=5)
        request.adapter_version = demo_runtime.adapters.resolve(info.adapter_id)
        requests[name] = (request, sink)
    base, _ = make_request("lp-base", prompt, max_tokens=12, logprobs=2)
    drive(demo_runtime, {0: [r for r, _ in requests.values()] + [base]})
    for name, temperature in cases.items():
        _, sink = requests[name]
        assert all(len(e.logprobs) == len(e.token_ids) for e in sink.events)
        ours = [lp for e in sink.events for lp in e.logprobs]
        assert [lp.token_id for lp in ours] == sink.token_ids and len(ours) == 12
        ids = torch.tensor([prompt + sink.token_ids[:-1]])
        with torch.no_grad():
            rows = peft_model(ids).logits[0, len(prompt) - 1 :]
            with peft_model.disable_adapter():
                plain = peft_model(ids).logits[0, len(prompt) - 1 :]
        scale = temperature or 1.0
        theirs = torch.log_softmax(rows / scale, -1)
        assert (theirs - torch.log_softmax(plain / scale, -1)).abs().max() > 1e-2, "the adapter must matter"
        worst = 0.0
        for step, lp in enumerate(ours):
            worst = max(worst, abs(lp.logprob - theirs[step, lp.token_id].item()))
            for token_id, logprob in lp.top:
                worst = max(worst, abs(logprob - theirs[step, token_id].item()))
            best = torch.topk(theirs[step], 5).values.tolist()
            worst = max(worst, max(abs(a - b) for (_, a), b in zip(lp.top, best)))
            if temperature == 0:
                assert lp.top[0][0] == lp.token_id
        print(f"{name}: max |ours - peft| logprob = {worst:.2e}")
        assert worst < 1e-4
