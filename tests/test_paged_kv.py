"""Paged KV cache and prefix caching: blocks taken as sequences grow, preemption when they run out
(never a crash, never a wrong token), and cached prompt blocks shared only under the same tenant and
adapter version, with outputs identical to computing them."""

from __future__ import annotations

import pytest

from server.config import EngineConfig, ServerConfig
from server.engine.block_pool import NULL_BLOCK, BlockPool, block_hash
from server.runtime import build_runtime
from tests.conftest import drive, make_request
from tests.test_tenancy import _lora


def test_pool_hands_out_zeroed_blocks_never_the_null_block_and_evicts_cached_ones_last():
    pool = BlockPool(num_blocks=4, block_size=2)
    got = [pool.allocate() for _ in range(3)]
    assert sorted(got) == [1, 2, 3] and NULL_BLOCK not in got and pool.allocate() is None
    assert pool.take_to_zero() == got and pool.take_to_zero() == []
    h = block_hash(b"", "acme", None, [5, 6])
    pool.register(got[0], h)
    pool.release(got)
    assert pool.num_available == 3 and pool.num_used == 0
    # The uncached blocks are handed out first; the cached one only when nothing else is left.
    again = [pool.allocate() for _ in range(2)]
    assert got[0] not in again and pool.cached_prefix([h]) == [got[0]]
    pool.release([got[0]])
    assert pool.allocate() == got[0] and pool.cached_prefix([h]) == []  # evicted: its hash is gone
    assert pool.take_to_zero() == [*again, got[0]]


def test_block_hash_names_tenant_version_prefix_and_tokens():
    base = block_hash(b"", "acme", None, [1, 2, 3])
    assert base == block_hash(b"", "acme", None, [1, 2, 3])
    for other in (
        block_hash(b"", "globex", None, [1, 2, 3]),
        block_hash(b"", "acme", "0123456789abcdef", [1, 2, 3]),
        block_hash(b"x" * 16, "acme", None, [1, 2, 3]),
        block_hash(b"", "acme", None, [1, 2, 4]),
    ):
        assert other != base


def _runtime(model_dir, adapters_dir, kv_cache_gb: float, max_model_len: int = 256):
    config = ServerConfig(
        model=model_dir,
        dtype="float32",
        adapters_dir=adapters_dir,
        engine=EngineConfig(
            max_model_len=max_model_len, max_num_seqs=8, max_batched_tokens=64, kv_cache_gb=kv_cache_gb
        ),
    )
    return build_runtime(config)


@pytest.fixture(scope="module")
def roomy(tiny_served_model_dir, tmp_path_factory):
    return _runtime(tiny_served_model_dir, tmp_path_factory.mktemp("paged"), kv_cache_gb=0.05)


def _run(runtime, prompt: list[int], adapter: str | None = None, tenant: str = "default", max_tokens: int = 12):
    request, sink = make_request("r", prompt, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    request.tenant = tenant
    request.adapter_version = None if adapter is None else runtime.adapters.resolve(adapter)
    drive(runtime, {0: [request]})
    logprobs = [lp for event in sink.events for lp in (event.logprobs or [])]
    return sink.token_ids, logprobs


def _hits(runtime) -> int:
    return runtime.engine.scheduler.blocks.counts.hit_tokens


PROMPT = [(7 * i + 3) % 251 + 5 for i in range(41)]  # 41 tokens: 2 full blocks are cacheable


def test_a_repeated_prompt_skips_its_cached_blocks_and_gives_identical_output(roomy):
    first = _run(roomy, PROMPT)
    before = _hits(roomy)
    second = _run(roomy, PROMPT)
    assert _hits(roomy) - before == 32  # two blocks of 16 reused, the last 9 tokens computed
    roomy.engine.scheduler.prefix_caching = False
    try:
        before = _hits(roomy)
        uncached = _run(roomy, PROMPT)
        assert _hits(roomy) == before
    finally:
        roomy.engine.scheduler.prefix_caching = True
    # Tokens and every logprob (fp32 logits through log-softmax) exactly the same, cached or not.
    assert first == second == uncached


def test_no_reuse_across_versions_adapters_or_tenants(roomy):
    _run(roomy, PROMPT)  # the base model's blocks are cached for tenant "default"
    roomy.adapters.upload("swap", *_lora(seed=1))
    for adapter, tenant in ((None, "globex"), ("swap", "default")):
        before = _hits(roomy)
        _run(roomy, PROMPT, adapter, tenant)
        assert _hits(roomy) == before, (adapter, tenant)
    before = _hits(roomy)
    v1 = _run(roomy, PROMPT, "swap")
    assert _hits(roomy) - before == 32  # same version: reused
    roomy.adapters.upload("swap", *_lora(seed=2))  # same id, new version
    before = _hits(roomy)
    v2 = _run(roomy, PROMPT, "swap")
    assert _hits(roomy) == before and v2[0] != v1[0]  # never the old version's KV
    fresh = _runtime(roomy.config.model, roomy.config.adapters_dir, kv_cache_gb=0.05)
    assert _run(fresh, PROMPT, "swap") == v2  # what v2 computes from scratch


def test_running_out_of_blocks_preempts_and_resumes_on_exactly_the_same_tokens(tiny_served_model_dir, tmp_path):
    # 10 blocks of 16 positions (one is the null block): four 20-token prompts growing to 52 tokens
    # need 16 blocks, so sequences are preempted mid-decode and recomputed later.
    per_block = 2 * 2 * 2 * 16 * 4 * 16  # K and V, 2 layers, 2 KV heads, head_dim 16, fp32, 16 positions
    tight = _runtime(tiny_served_model_dir, tmp_path, kv_cache_gb=10 * per_block / 2**30, max_model_len=64)
    assert tight.engine.scheduler.blocks.num_blocks == 10
    prompts = [[(13 * i + 7 * j) % 300 + 2 for j in range(20)] for i in range(4)]
    alone = []
    for prompt in prompts:
        request, sink = make_request("alone", prompt, max_tokens=32, ignore_eos=True)
        drive(tight, {0: [request]})
        alone.append(sink.token_ids)
    pairs = [make_request(f"p{i}", p, max_tokens=32, ignore_eos=True) for i, p in enumerate(prompts)]
    preempted_before = tight.metrics.preemptions._value.get()
    drive(tight, {0: [r for r, _ in pairs]})
    assert tight.metrics.preemptions._value.get() > preempted_before
    assert [sink.token_ids for _, sink in pairs] == alone
    assert tight.engine.scheduler.blocks.num_used == 0
