"""One request's numerical failure stays that request's: a poisoned adapter (weights that overflow
at run time, past what upload validation can see) ends its own request with an error, and neither
its batch neighbours nor later users of its KV slot see any of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.config import EngineConfig, ServerConfig
from server.engine.request import SamplingParams
from server.runtime import build_runtime
from tests.conftest import drive, make_request
from tests.peft_helpers import save_peft_adapter

POISON_VERSION = "badbadbadbadbad0"


@pytest.fixture(scope="module")
def runtime(demo_model_dir, tmp_path_factory):
    config = ServerConfig(
        model=demo_model_dir,
        dtype="float32",
        adapters_dir=tmp_path_factory.mktemp("adapters"),
        engine=EngineConfig(max_model_len=256, max_num_seqs=4, max_batched_tokens=256, kv_cache_gb=0.5),
    )
    return build_runtime(config)


@pytest.fixture(scope="module")
def poisoned(runtime, hf_demo_model, tmp_path_factory) -> str:
    """A valid LoRA given lora_alpha 1e308 after validation (what upload now refuses; here it stands
    for any adapter whose numbers overflow only on some inputs). Returns its version, resident in
    the host cache."""
    from peft import LoraConfig

    files = save_peft_adapter(
        hf_demo_model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        tmp_path_factory.mktemp("poison"),
        seed=3,
        scale=0.05,
    )
    info = runtime.adapters.upload("poison-src", *files)
    parsed = runtime.adapters.cache.get(info.version)
    layers = {path: dataclasses.replace(f, scale=1e308 / f.rank) for path, f in parsed.layers.items()}
    runtime.adapters.cache.put(POISON_VERSION, dataclasses.replace(parsed, layers=layers))
    return POISON_VERSION


def _ids(runtime, text: str) -> list[int]:
    return runtime.tokenizer.encode(text)


def _request(runtime, rid: str, text: str, version: str | None = None, max_tokens: int = 12, **params):
    request, sink = make_request(rid, _ids(runtime, text), max_tokens=max_tokens, ignore_eos=True, **params)
    if version is not None:
        assert runtime.adapters.cache.hold(version), "the poisoned version must be in memory"
        request.adapter_version = version
    return request, sink


LONG = "The history of the printing press begins in the fifteenth century, when movable type " * 3
SHORT = "Hi"


def _base_pair(runtime, tag: str) -> tuple[list[int], list[int]]:
    """A short base request in the lowest KV slot decoding beside a long one, so the short one's
    decode attention reads (masked) positions of its slot beyond its own length."""
    short, short_sink = _request(runtime, f"short-{tag}", SHORT)
    long, long_sink = _request(runtime, f"long-{tag}", LONG)
    drive(runtime, {0: [short, long]})
    assert short_sink.finish_reason == long_sink.finish_reason == "length"
    return short_sink.token_ids, long_sink.token_ids


def test_poisoned_request_fails_alone_and_leaves_nothing_in_the_kv_cache(runtime, poisoned):
    clean = _base_pair(runtime, "before")

    # The poisoned request shares its batch with a base request; both prefill long prompts into the
    # KV cache (the poisoned one fills slot 0 with non-finite keys and values).
    victim, victim_sink = _request(runtime, "victim", SHORT)
    bad, bad_sink = _request(runtime, "poisoned", LONG + LONG, version=poisoned)
    neighbour, neighbour_sink = _request(runtime, "neighbour", LONG)
    drive(runtime, {0: [bad, neighbour], 2: [victim]})
    assert bad_sink.finish_reason == "error"
    assert bad_sink.events[-1].error.kind == "non_finite_output"
    assert neighbour_sink.finish_reason == "length" and neighbour_sink.token_ids == clean[1]
    assert victim_sink.token_ids == clean[0]

    # Later base requests land in the slot the poisoned request used: same tokens as before.
    assert _base_pair(runtime, "after") == clean
    for cache in runtime.engine.runner.kv_cache.keys + runtime.engine.runner.kv_cache.values:
        assert torch.isfinite(cache).all()


def test_poisoned_sampled_request_is_an_error_not_a_crash(runtime, poisoned):
    clean, _ = _base_pair(runtime, "sampled-before")
    bad, bad_sink = _request(runtime, "poisoned-sampled", SHORT, version=poisoned, temperature=0.8, seed=1)
    other, other_sink = _request(runtime, "other-sampled", SHORT, temperature=0.8, seed=1)
    drive(runtime, {0: [bad, other]})
    assert bad_sink.finish_reason == "error"
    assert other_sink.finish_reason == "length" and len(other_sink.token_ids) == 12
    assert _base_pair(runtime, "sampled-after")[0] == clean


def test_temperature_that_overflows_is_that_requests_error(runtime):
    tiny, tiny_sink = _request(runtime, "tiny-temp", SHORT, temperature=1e-30, seed=2)
    greedy, greedy_sink = _request(runtime, "greedy", SHORT)
    drive(runtime, {0: [tiny, greedy]})
    # Below 1e-5 a temperature is greedy (dividing by it would overflow float32).
    assert tiny_sink.token_ids == greedy_sink.token_ids
    assert SamplingParams(max_tokens=1, temperature=1e-6).greedy
