"""Batch invariance (--batch-invariant): a request's logits are bitwise the same alone and inside any batch —
neighbours of other lengths and adapter kinds, other prefill chunk sizes, a merged phase of another
adapter in between — in float32 and bfloat16; seeded sampling then gives the same tokens."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from kernels import invariant
from server.config import EngineConfig, ServerConfig
from server.runtime import Runtime, build_runtime
from tests.conftest import drive, make_request
from tests.peft_helpers import save_peft_adapter

KINDS = ["lora", "dora", "vera", "randlora"]


def _configs():
    from peft import LoraConfig, RandLoraConfig, VeraConfig

    return {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj", "up_proj"]),
        "vera": VeraConfig(r=16, target_modules=["q_proj", "k_proj", "o_proj"], projection_prng_key=2),
        "randlora": RandLoraConfig(r=8, target_modules=["v_proj", "up_proj", "down_proj"], projection_prng_key=4),
    }


@pytest.fixture(scope="module")
def adapter_files(tiny_served_model_dir, tmp_path_factory):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_served_model_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            kind: save_peft_adapter(base, cfg, tmp_path_factory.mktemp(kind), seed=30 + i, scale=0.3)
            for i, (kind, cfg) in enumerate(_configs().items())
        }


def _runtime(model_dir, adapters_dir, adapter_files, dtype: str, chunk: int) -> Runtime:
    config = ServerConfig(
        model=model_dir,
        dtype=dtype,
        adapters_dir=adapters_dir,
        engine=EngineConfig(
            max_model_len=256,
            max_num_seqs=min(40, chunk),
            max_batched_tokens=chunk,
            kv_cache_gb=0.05,
            prefix_caching=False,  # every run computes its prompts: a cached block would hide a prefill difference
            batch_invariant=True,
        ),
    )
    runtime = build_runtime(config)
    for kind, files in adapter_files.items():
        runtime.adapters.upload(f"inv-{kind}", *files)
    return runtime


def _capture(runtime: Runtime) -> dict[str, list[torch.Tensor]]:
    """Every logits row the engine samples from, by request id, in step order."""
    seen: dict[str, list[torch.Tensor]] = {}
    run = runtime.engine.runner.run

    def recording(batch):
        logits = run(batch)
        for seq, row in zip(batch.sampled(), logits):
            seen.setdefault(seq.request_id, []).append(row.clone())
        return logits

    runtime.engine.runner.run = recording
    return seen


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 30000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# The requests compared: one per adapter kind and one on the base model, greedy and seeded-sampled.
TARGETS = [(kind, sampled) for kind in [None, *KINDS] for sampled in (False, True)]


def _request(runtime: Runtime, rid: str, index: int, kind: str | None, sampled: bool, length: int, tokens: int):
    params = dict(temperature=0.9, seed=7 + index) if sampled else dict(temperature=0.0)
    request, sink = make_request(rid, _prompt(index, length), max_tokens=tokens, ignore_eos=True, **params)
    request.adapter_version = None if kind is None else runtime.adapters.resolve(f"inv-{kind}")
    return request, sink


def _alone(runtime: Runtime, seen) -> dict[int, tuple[list[torch.Tensor], list[int]]]:
    out = {}
    for i, (kind, sampled) in enumerate(TARGETS):
        request, sink = _request(runtime, f"alone{i}", i, kind, sampled, length=20 + 7 * i, tokens=6)
        drive(runtime, {0: [request]})
        out[i] = (seen.pop(f"alone{i}"), sink.token_ids)
    return out


def _crowded(runtime: Runtime, seen, neighbours: int) -> dict[int, tuple[list[torch.Tensor], list[int]]]:
    """The targets again, arriving at different steps among `neighbours` requests of every kind and of
    varied lengths, which arrive and finish around them (batch sizes vary step to step)."""
    schedule: dict[int, list] = {}
    kinds = [None, *KINDS]
    for j in range(neighbours):
        request, _ = _request(
            runtime, f"n{j}", 100 + j, kinds[j % 5], j % 3 == 0, length=3 + 11 * j % 90, tokens=2 + j % 7
        )
        schedule.setdefault(j % 4, []).append(request)
    sinks = {}
    for i, (kind, sampled) in enumerate(TARGETS):
        request, sinks[i] = _request(runtime, f"crowd{i}", i, kind, sampled, length=20 + 7 * i, tokens=6)
        schedule.setdefault(i % 3 + 1, []).append(request)
    drive(runtime, schedule)
    return {i: (seen.pop(f"crowd{i}"), sinks[i].token_ids) for i in sinks}


def _assert_same(expected, got) -> None:
    for i, (kind, sampled) in enumerate(TARGETS):
        (want_logits, want_tokens), (logits, tokens) = expected[i], got[i]
        assert tokens == want_tokens, f"target {i} ({kind}, sampled={sampled}): tokens differ"
        assert len(logits) == len(want_logits)
        for step, (a, b) in enumerate(zip(want_logits, logits)):
            assert torch.equal(a, b), f"target {i} ({kind}, sampled={sampled}) step {step}: {(a - b).abs().max()}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_alone_equal_logits_among_neighbours_and_other_chunk_sizes(
    dtype, tiny_served_model_dir, adapter_files, tmp_path
):
    runtime = _runtime(tiny_served_model_dir, tmp_path / "a", adapter_files, dtype, chunk=64)
    seen = _capture(runtime)
    alone = _alone(runtime, seen)
    for neighbours in (1, 32):
        _assert_same(alone, _crowded(runtime, seen, neighbours))
    # Other prefill chunk sizes: the prompts (20-83 tokens) alone, split in chunks of 16 or 40 tokens
    for chunk in (16, 40):
        other = _runtime(tiny_served_model_dir, tmp_path / f"c{chunk}", adapter_files, dtype, chunk=chunk)
        _assert_same(alone, _alone(other, _capture(other)))


def test_merged_phase_of_another_adapter_leaves_logits_unchanged(tiny_served_model_dir, adapter_files, tmp_path):
    runtime = _runtime(tiny_served_model_dir, tmp_path, adapter_files, "float32", chunk=64)
    seen = _capture(runtime)
    alone = _alone(runtime, seen)
    engine = runtime.engine
    merges, engine.phases.policy.min_merge_steps = engine.phases.counts.merges, 2
    schedule: dict[int, list] = {}
    for j in range(6):  # a LoRA flood that the phase controller merges
        request, _ = _request(runtime, f"m{j}", 200 + j, "lora", False, length=30, tokens=30)
        request.mode = "auto"
        schedule.setdefault(0, []).append(request)
    sinks = {}
    for i, (kind, sampled) in enumerate(TARGETS):
        if kind == "lora":
            continue
        request, sinks[i] = _request(runtime, f"crowd{i}", i, kind, sampled, length=20 + 7 * i, tokens=6)
        schedule.setdefault(6 + i, []).append(request)
    drive(runtime, schedule)
    assert engine.phases.counts.merges > merges, "the LoRA flood must have been merged"
    for i in sinks:
        logits, tokens = seen.pop(f"crowd{i}"), sinks[i].token_ids
        assert tokens == alone[i][1]
        assert all(torch.equal(a, b) for a, b in zip(alone[i][0], logits, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_give_a_row_the_same_bits_at_any_batch_size_and_position(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 576, generator=gen).to(dtype)
    weight = torch.randn(49152, 576, generator=gen).to(dtype)[:4096]  # lm_head-like width, trimmed for time
    small = torch.randn(576, 8, generator=gen).to(dtype)  # an adapter shrink
    with invariant.mode(True):
        row, shrunk = invariant.linear(x[:1], weight), invariant.mm(x[:1], small)
        for rows in (2, 15, 17, 33, 100, 300):
            batch = torch.roll(x[:rows], shifts=rows // 2, dims=0)  # x[0] at another position
            assert torch.equal(invariant.linear(batch, weight)[rows // 2], row[0])
            assert torch.equal(invariant.mm(batch, small)[rows // 2], shrunk[0])


def test_attention_of_a_token_ignores_padding_and_the_phase():
    """A decode row padded to longer contexts, and the same token as the last row of a prefill, agree."""
    gen = torch.Generator().manual_seed(0)
    length, kv_heads, group, dim = 37, 2, 3, 16
    q = torch.randn(1, kv_heads, group, dim, generator=gen)
    keys = torch.randn(1, 200, kv_heads, dim, generator=gen)
    values = torch.randn(1, 200, kv_heads, dim, generator=gen)
    alone = invariant.attend(q, keys[:, :length], values[:, :length], torch.ones(1, length, dtype=torch.bool), 0.25)
    for padded in (38, 64, 200):
        visible = torch.arange(padded)[None] < length
        assert torch.equal(invariant.attend(q, keys[:, :padded], values[:, :padded], visible, 0.25), alone)
    queries = torch.cat([torch.randn(4, kv_heads, group, dim, generator=gen), q])  # a prefill chunk ending in q
    causal = torch.arange(length)[None] <= torch.arange(length - 5, length)[:, None]
    assert torch.equal(invariant.attend(queries, keys[:, :length], values[:, :length], causal, 0.25)[-1:], alone)
    reference = F.scaled_dot_product_attention(
        q.flatten(1, 2)[:, :, None],
        keys[0, :length].repeat_interleave(group, 1).transpose(0, 1)[None],
        values[0, :length].repeat_interleave(group, 1).transpose(0, 1)[None],
        scale=0.25,
    )
    torch.testing.assert_close(alone.flatten(1, 2), reference[:, :, 0], rtol=1e-5, atol=1e-6)


def test_flag_turns_invariance_on_and_it_is_off_by_default():
    from server.config import parse_args

    assert parse_args(["--batch-invariant", "true"]).engine.batch_invariant
    assert not parse_args([]).engine.batch_invariant
    assert not invariant.enabled()  # the switch is the runner's, per thread: nothing leaks out of a step
