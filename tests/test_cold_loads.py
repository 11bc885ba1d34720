"""Cold adapters through the loader: a request on a version that is only on disk is admitted once the
loader has brought it in, while others keep running; a version that cannot be loaded ends its own
requests with an error instead of leaving them waiting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from server.config import EngineConfig, ServerConfig
from server.runtime import build_runtime
from tests.conftest import drive, make_request

TINY_TARGETS = {"q_proj": 64, "v_proj": 32}  # build_tiny_llama: hidden 64, 4 heads, 2 KV heads of 16


def _tiny_lora(seed: int) -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for proj, out in TINY_TARGETS.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 64, generator=g) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.3
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(TINY_TARGETS)}
    return json.dumps(config).encode(), save(tensors)


@pytest.fixture
def config(tiny_served_model_dir, tmp_path) -> ServerConfig:
    return ServerConfig(
        model=tiny_served_model_dir,
        dtype="float32",
        adapters_dir=tmp_path,
        engine=EngineConfig(max_model_len=128, max_num_seqs=4, kv_cache_gb=0.05),
    )


def _run(runtime, jobs: dict[str, str | None]) -> dict:
    sinks, requests = {}, []
    for rid, adapter_id in jobs.items():
        request, sink = make_request(rid, runtime.tokenizer.encode("Tell me a story"), max_tokens=6, ignore_eos=True)
        request.adapter_version = None if adapter_id is None else runtime.adapters.resolve(adapter_id)
        requests.append(request)
        sinks[rid] = sink
    drive(runtime, {0: requests})
    return sinks


def test_cold_version_is_loaded_by_the_loader_and_gives_the_warm_tokens(config):
    first = build_runtime(config)
    first.adapters.upload("story", *_tiny_lora(1))
    warm = _run(first, {"warm": "story"})["warm"].token_ids
    restarted = build_runtime(config)  # nothing in memory: the version is on disk only
    version = restarted.adapters.get("story").version
    assert not restarted.adapters.cache.resident(version)
    sinks = _run(restarted, {"cold": "story", "base": None})
    assert sinks["cold"].token_ids == warm and sinks["base"].finish_reason == "length"
    counts = restarted.adapters.cache.counts
    assert (counts.hits, counts.loads) == (0, 1)


def test_a_version_that_cannot_be_loaded_fails_its_requests_only(config, tmp_path):
    first = build_runtime(config)
    broken = first.adapters.upload("broken", *_tiny_lora(2))
    first.adapters.upload("intact", *_tiny_lora(3))
    weights = tmp_path / broken.tenant / "broken" / broken.version / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * weights.stat().st_size)  # bit rot under a published version
    restarted = build_runtime(config)
    sinks = _run(restarted, {"on-broken": "broken", "on-intact": "intact", "base": None})
    assert sinks["on-broken"].finish_reason == "error"
    error = sinks["on-broken"].events[-1].error
    assert error.kind == "adapter_load_failed" and "broken" in error.message
    assert sinks["on-intact"].finish_reason == "length" and sinks["base"].finish_reason == "length"
    assert restarted.adapters.cache.load_error(broken.version) is None  # released: a later request retries


def test_the_loader_and_the_upload_worker_do_their_torch_math_on_one_core(config, monkeypatch):
    """Any thread beside the engine that runs multi-threaded torch ops keeps an OpenMP team alive, and
    then every engine step runs slower (server/cpu_threads.py): both workers must stay on one core."""
    first = build_runtime(config)
    first.adapters.upload("story", *_tiny_lora(1))
    restarted = build_runtime(config)
    seen: dict[str, int] = {}
    fill, upload = restarted.adapters.cache.fill, restarted.adapters.upload

    def fill_noting_threads(version, parsed):
        seen["loader"] = torch.get_num_threads()
        return fill(version, parsed)

    def upload_noting_threads(*args, **kwargs):
        seen["upload"] = torch.get_num_threads()
        return upload(*args, **kwargs)

    monkeypatch.setattr(restarted.adapters.cache, "fill", fill_noting_threads)
    monkeypatch.setattr(restarted.adapters, "upload", upload_noting_threads)
    restarted.adapters.submit_upload("another", *_tiny_lora(4)).result(timeout=60)
    assert _run(restarted, {"cold": "story"})["cold"].finish_reason == "length"
    assert seen == {"loader": 1, "upload": 1}
