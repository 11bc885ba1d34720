"""Deleted and replaced adapter versions leave the host cache, and their memory goes back to the OS.

Integration tests drive the real upload path (the service's low-priority upload worker, as the HTTP
route does) with LoRA r16 adapters on q,k,v,o of SmolLM2 (7.4 MB each), and read the process RSS.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save

from adapters_store import AdapterNotFound
from server.adapters import host_cache
from server.adapters.host_cache import HostCache
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.runtime import build_runtime
from tests.conftest import drive, make_request

P = "base_model.model.model.layers."
MB = 2**20
RSS_MARGIN = 100 * MB
glibc_trim = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="RSS checks need /proc and glibc's malloc_trim",
)


# ---- HostCache unit tests ------------------------------------------------------------------------
@dataclass
class Fake:
    nbytes: int


def test_discard_unheld_drops_at_once():
    cache = HostCache(max_bytes=10**9)
    cache.put("a", Fake(100))
    cache.put("b", Fake(50))
    assert len(cache) == 2 and cache.nbytes == 150
    cache.discard("a")
    assert "a" not in cache and "b" in cache and cache.nbytes == 50 and not cache.is_discarded("a")
    cache.discard("a")  # already gone: no-op
    cache.discard("never-seen")
    assert len(cache) == 1 and cache.nbytes == 50


def test_discard_held_drops_at_last_release():
    cache = HostCache(max_bytes=10**9)
    parsed = Fake(100)
    cache.put("a", parsed)
    assert cache.hold("a") and cache.hold("a")
    cache.discard("a")
    assert cache.get("a") is parsed and cache.is_discarded("a") and cache.nbytes == 100
    cache.release("a")
    assert cache.get("a") is parsed and cache.nbytes == 100
    cache.release("a")
    assert "a" not in cache and len(cache) == 0 and cache.nbytes == 0 and not cache.is_discarded("a")


def test_put_cancels_pending_discard():
    cache = HostCache(max_bytes=10**9)
    cache.put("a", Fake(100))
    assert cache.hold("a")
    cache.discard("a")
    cache.put("a", Fake(100))  # the same content published again (same version)
    assert not cache.is_discarded("a") and cache.nbytes == 100 and len(cache) == 1
    cache.release("a")
    assert "a" in cache and cache.nbytes == 100


def test_running_total_and_lru_eviction_skip_held():
    cache = HostCache(max_bytes=250)
    for version in "abc":
        cache.put(version, Fake(100))
    assert [v for v in "abc" if v in cache] == ["b", "c"] and cache.nbytes == 200  # a was LRU
    assert cache.hold("b")
    cache.put("c", Fake(120))  # replacing an entry replaces its bytes
    assert cache.nbytes == 220
    cache.put("d", Fake(100))  # c is LRU and unheld; b is held
    assert [v for v in "bcd" if v in cache] == ["b", "d"] and cache.nbytes == 200
    assert not cache.hold("e")  # a miss: the loader brings it in
    loaded = Fake(100)
    cache.fill("e", loaded)  # over budget with b, e held
    assert cache.get("e") is loaded and "d" not in cache and cache.nbytes == 200
    cache.release("b")
    cache.release("e")
    assert cache.nbytes == 200 and len(cache) == 2


def test_trim_only_after_enough_dropped_bytes(monkeypatch):
    calls = []
    monkeypatch.setattr(host_cache, "release_free_memory", lambda: calls.append(1) or True)
    cache = HostCache(max_bytes=10**9, trim_after_bytes=1000)
    for i in range(5):
        cache.put(f"v{i}", Fake(300))
    cache.discard("v0")
    cache.discard("v1")
    cache.discard("v2")
    assert calls == []  # 900 bytes dropped
    assert cache.hold("v3")
    cache.discard("v3")
    assert calls == []  # held: nothing dropped yet
    cache.release("v3")
    assert calls == [1] and cache.trims == 1  # 1200 bytes dropped: one trim, counter reset
    cache.discard("v4")
    assert calls == [1] and len(cache) == 0 and cache.nbytes == 0


# ---- the real upload path --------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


CONFIG = json.dumps(
    {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 16,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
).encode()


class LoraR16:
    """LoRA r16 on q,k,v,o of SmolLM2 (7.4 MB); `weights(k)` is a distinct adapter for every k."""

    SHAPES = {
        "self_attn.q_proj": (576, 576),
        "self_attn.k_proj": (192, 576),
        "self_attn.v_proj": (192, 576),
        "self_attn.o_proj": (576, 576),
    }

    def __init__(self, seed: int = 0, scale: float = 0.05) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tensors = {}
        for i in range(30):
            for proj, (out_f, in_f) in self.SHAPES.items():
                self.tensors[f"{P}{i}.{proj}.lora_A.weight"] = torch.randn(16, in_f, generator=g) * scale
                self.tensors[f"{P}{i}.{proj}.lora_B.weight"] = torch.randn(out_f, 16, generator=g) * scale
        self._first = next(iter(self.tensors.values()))

    def weights(self, k: int) -> bytes:
        self._first[0, 0] = float(k)
        return save(self.tensors)


@pytest.fixture(scope="module")
def runtime(demo_model_dir, tmp_path_factory):
    """Engine driven by hand; host cache far above what the tests upload, so only discards drop."""
    return build_runtime(
        ServerConfig(
            model=demo_model_dir,
            dtype="float32",
            adapters_dir=tmp_path_factory.mktemp("memory-adapters"),
            engine=EngineConfig(max_model_len=256, max_num_seqs=2, max_batched_tokens=128, kv_cache_gb=0.05),
            adapters=AdapterConfig(host_cache_gb=8.0),
        )
    )


def upload(runtime, adapter_id: str, weights: bytes) -> str:
    return runtime.adapters.submit_upload(adapter_id, CONFIG, weights).result().version


def assert_cache_empty(runtime) -> None:
    cache = runtime.adapters.cache
    assert (len(cache), cache.nbytes) == (0, 0)


@glibc_trim
def test_upload_delete_rounds_return_memory(runtime):
    lora, service = LoraR16(), runtime.adapters
    for k in range(10):  # warm up allocator arenas and the upload worker
        upload(runtime, "warm", lora.weights(-1 - k))
    service.delete("warm")
    assert_cache_empty(runtime)
    start = rss()

    for k in range(300):  # upload + delete
        upload(runtime, f"round-{k}", lora.weights(k))
        service.delete(f"round-{k}")
    assert_cache_empty(runtime)
    grown = rss() - start
    print(f"RSS {start / MB:.0f} MB at start, {grown / MB:+.0f} MB after 300 upload+delete rounds")
    assert grown < RSS_MARGIN, f"RSS grew {grown / MB:.0f} MB over 300 upload+delete rounds"

    for k in range(50):  # hot swaps: each re-upload replaces the previous version
        upload(runtime, "swapped", lora.weights(1000 + k))
    assert len(service.cache) == 1
    service.delete("swapped")
    assert_cache_empty(runtime)

    for k in range(40):  # 300 MB cached at once, then deleted: the heap must shrink back
        upload(runtime, f"batch-{k}", lora.weights(2000 + k))
    assert service.cache.nbytes == 40 * 7372800
    held = rss() - start
    assert held > 200 * MB
    for k in range(40):
        service.delete(f"batch-{k}")
    assert_cache_empty(runtime)
    grown = rss() - start
    print(f"RSS {held / MB:+.0f} MB with 40 adapters cached, {grown / MB:+.0f} MB once they are deleted")
    assert grown < RSS_MARGIN, f"RSS grew {grown / MB:.0f} MB after 40 adapters were uploaded and deleted"


def _request(runtime, rid: str, adapter_id: str | None):
    ids = runtime.tokenizer.encode_chat([{"role": "user", "content": "Name a color."}])
    request, sink = make_request(rid, ids, max_tokens=6, ignore_eos=True)
    request.adapter_version = None if adapter_id is None else runtime.adapters.resolve(adapter_id)
    return request, sink


def test_held_version_survives_delete_until_released(runtime):
    service, cache = runtime.adapters, runtime.adapters.cache
    version = upload(runtime, "held", LoraR16(seed=1, scale=0.2).weights(0))
    reference, ref_sink = _request(runtime, "before-delete", "held")
    drive(runtime, {0: [reference]})
    base, base_sink = _request(runtime, "base", None)
    drive(runtime, {0: [base]})
    assert ref_sink.token_ids != base_sink.token_ids  # the adapter changes the answer

    request, sink = _request(runtime, "holding", "held")
    service.delete("held")
    with pytest.raises(AdapterNotFound):
        service.resolve("held")
    assert version in cache and cache.is_discarded(version)
    drive(runtime, {0: [request]})
    assert sink.finish_reason == "length" and sink.token_ids == ref_sink.token_ids
    assert version not in cache
    assert_cache_empty(runtime)


def test_replaced_version_survives_reupload_until_released(runtime):
    service, cache = runtime.adapters, runtime.adapters.cache
    lora = LoraR16(seed=2, scale=0.2)
    old = upload(runtime, "swap", lora.weights(0))
    reference, ref_sink = _request(runtime, "old-alone", "swap")
    drive(runtime, {0: [reference]})

    request, sink = _request(runtime, "on-old", "swap")
    new = upload(runtime, "swap", LoraR16(seed=3, scale=0.2).weights(0))
    assert new != old and old in cache and cache.is_discarded(old) and not cache.is_discarded(new)
    drive(runtime, {0: [request]})
    assert sink.token_ids == ref_sink.token_ids
    assert old not in cache and new in cache and len(cache) == 1
    service.delete("swap")
    assert_cache_empty(runtime)


def test_version_shared_by_two_ids_stays_until_both_are_gone(runtime):
    service, cache = runtime.adapters, runtime.adapters.cache
    weights = LoraR16(seed=4).weights(0)
    first, second = upload(runtime, "twin-a", weights), upload(runtime, "twin-b", weights)
    assert first == second and len(cache) == 1  # same content, same version
    service.delete("twin-a")
    assert first in cache and not cache.is_discarded(first)
    upload(runtime, "twin-b", weights)  # re-upload of identical content: no change
    assert first in cache
    service.delete("twin-b")
    assert_cache_empty(runtime)
