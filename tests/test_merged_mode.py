"""Merged mode: exact merge/restore for every kind, phase switches mid-stream, no starvation."""

from __future__ import annotations

import pytest
import torch

from server.engine.phases import GATHERED, Phase, PhasePolicy
from tests.conftest import drive, make_request
from tests.peft_helpers import ALL_TARGETS, our_logits, pristine, save_peft_adapter, train_adalora


def _configs():
    from peft import LoraConfig, RandLoraConfig, VeraConfig

    return {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS),
        "rslora": LoraConfig(r=16, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj"]),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
        "vera": VeraConfig(
            r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], projection_prng_key=2, save_projection=False
        ),
        "randlora": RandLoraConfig(
            r=32, target_modules=["v_proj", "up_proj"], projection_prng_key=4, save_projection=False
        ),
    }


@pytest.fixture(scope="module")
def merge_adapters(demo_runtime, hf_demo_model, tmp_path_factory):
    infos = {}
    for i, (name, cfg) in enumerate(_configs().items()):
        files = save_peft_adapter(hf_demo_model, cfg, tmp_path_factory.mktemp(name), seed=80 + i, scale=0.02)
        infos[name] = demo_runtime.adapters.upload(f"merge-{name}", *files)
    files = train_adalora(hf_demo_model, tmp_path_factory.mktemp("adalora-merge"), steps=4)
    infos["adalora"] = demo_runtime.adapters.upload("merge-adalora", *files)
    return infos


KINDS = ["lora", "rslora", "dora", "adalora", "vera", "randlora"]


@pytest.mark.parametrize("kind", KINDS)
def test_merged_logits_equal_gathered_and_restore_is_exact(demo_runtime, merge_adapters, kind):
    model = pristine(demo_runtime)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    version = demo_runtime.adapters.resolve(merge_adapters[kind].adapter_id)
    try:
        parsed = demo_runtime.adapters.cache.get(version)
        ids = torch.tensor(demo_runtime.tokenizer.encode_chat([{"role": "user", "content": "Name a color."}]))
        gathered = our_logits(model, ids, parsed)
        manager = demo_runtime.engine.runner.adapters
        manager.merge(version)
        try:
            merged = our_logits(model, ids)
            changed = [n for n, p in model.named_parameters() if not torch.equal(p, originals[n])]
        finally:
            manager.restore()
        # Merging rounds every adapted weight differently from the gathered path. PEFT's own
        # merge_and_unload differs from its unmerged forward on this model by 7.4e-5 (LoRA, all
        # targets) and 2.4e-4 (RandLoRA, full rank); ours measured up to 1.4e-4 and 3.4e-4 with
        # logits ~25. Greedy tokens are compared in the next test.
        assert (merged - gathered).abs().max().item() < 5e-4
        assert changed, "merging must change some weights"
        for name, p in model.named_parameters():
            assert torch.equal(p, originals[name]), f"{name} not restored exactly"
    finally:
        demo_runtime.adapters.cache.release(version)


def _run(runtime, jobs, mode, schedule_steps=None):
    pairs = []
    for i, (adapter_id, text) in enumerate(jobs):
        ids = runtime.tokenizer.encode_chat([{"role": "user", "content": text}])
        request, sink = make_request(f"{mode}{i}", ids, max_tokens=12, ignore_eos=True)
        request.adapter_version = None if adapter_id is None else runtime.adapters.resolve(adapter_id)
        request.mode = mode
        pairs.append((request, sink))
    schedule: dict[int, list] = {}
    for i, (request, _) in enumerate(pairs):
        schedule.setdefault(0 if schedule_steps is None else schedule_steps[i], []).append(request)
    drive(runtime, schedule)
    return [sink.token_ids for _, sink in pairs]


@pytest.mark.parametrize("kind", KINDS)
def test_merged_greedy_tokens_equal_gathered(demo_runtime, merge_adapters, kind):
    jobs = [(merge_adapters[kind].adapter_id, "Write a sentence about autumn.")]
    pristine(demo_runtime)
    merges = demo_runtime.engine.phases.counts.merges
    merged = _run(demo_runtime, jobs, "merged")
    assert demo_runtime.engine.phases.counts.merges == merges + 1
    assert merged == _run(demo_runtime, jobs, "gathered")


def test_switching_phases_mid_stream_gives_all_gathered_tokens(demo_runtime, merge_adapters):
    jobs = [
        (merge_adapters["lora"].adapter_id, "Tell me about owls."),
        (merge_adapters["lora"].adapter_id, "Tell me about cats."),
        (merge_adapters["dora"].adapter_id, "Tell me about dogs."),
        (None, "Tell me about fish."),
    ]
    steps = [0, 0, 5, 9]  # two lora requests alone (auto merges), then others arrive mid-stream
    expected = _run(demo_runtime, jobs, "gathered", steps)
    counts = demo_runtime.engine.phases.counts
    merges = counts.merges
    demo_runtime.engine.phases.policy.min_merge_steps = 4  # these requests are short: merge them anyway
    try:
        assert _run(demo_runtime, jobs, "auto", steps) == expected
    finally:
        demo_runtime.engine.phases.policy.min_merge_steps = 48
    assert counts.merges > merges, "auto must have merged while one adapter owned the queue"


def test_flooded_adapter_does_not_starve_another(demo_runtime, merge_adapters):
    engine = demo_runtime.engine
    engine.phases.policy.max_wait_s = 0.05
    try:
        flood = [(merge_adapters["lora"].adapter_id, f"Story number {i}, please.") for i in range(6)]
        pairs = []
        for i, (adapter_id, text) in enumerate(flood + [(merge_adapters["vera"].adapter_id, "Hi!")]):
            ids = demo_runtime.tokenizer.encode_chat([{"role": "user", "content": text}])
            request, sink = make_request(f"flood{i}", ids, max_tokens=40 if i < 6 else 4, ignore_eos=True)
            request.adapter_version = demo_runtime.adapters.resolve(adapter_id)
            request.mode = "merged"
            pairs.append((request, sink))
        order = []
        for request, _ in pairs:
            original = request.emit
            request.emit = lambda ev, rid=request.request_id, f=original: (
                f(ev),
                ev.finish_reason and order.append(rid),
            )
        drive(demo_runtime, {0: [p[0] for p in pairs[:6]], 2: [pairs[6][0]]})
        assert order.index("flood6") < 6, f"the lone request waited for the whole flood: {order}"
    finally:
        engine.phases.policy.max_wait_s = 0.5


class W:
    def __init__(self, rid: str, version: str | None, mode: str = "auto", remaining: int = 100) -> None:
        self.request_id, self.version, self.mode, self.remaining_tokens = rid, version, mode, remaining


def test_policy_auto_merges_only_enough_work_and_yields_at_once():
    policy = PhasePolicy(max_wait_s=10, min_merge_steps=48)
    assert policy.next_phase(GATHERED, [W("v", "V", remaining=10)], now=0.0) == GATHERED  # not worth it
    assert policy.next_phase(GATHERED, [W("v", "V", remaining=60)], now=0.0) == Phase("V")
    assert policy.next_phase(Phase("V"), [W("v", "V"), W("w", "W")], now=0.0) == GATHERED  # auto never holds


def test_policy_merges_owner_holds_others_within_bound_then_owes_them():
    policy = PhasePolicy(max_wait_s=0.5)
    flood = [W(f"v{i}", "V", "merged") for i in range(3)]
    phase = policy.next_phase(GATHERED, flood, now=0.0)
    assert phase == Phase("V")  # merged requests of one adapter
    other = W("w", "W")
    assert policy.next_phase(phase, flood + [other], now=0.1) == Phase("V")  # held, within bound
    assert policy.next_phase(phase, flood + [other], now=0.59) == Phase("V")
    assert policy.next_phase(phase, flood + [other], now=0.61) == GATHERED  # bound exceeded
    # owed: stays gathered until w is done, even though "merged" requests keep coming
    assert policy.next_phase(GATHERED, flood + [other, W("m", "V", "merged")], now=0.7) == GATHERED
    assert policy.next_phase(GATHERED, flood, now=0.8) == Phase("V")


def test_policy_gathered_requests_are_never_held():
    policy = PhasePolicy(max_wait_s=10)
    assert policy.next_phase(Phase("V"), [W("v", "V"), W("g", "W", "gathered")], now=0.0) == GATHERED
    assert policy.next_phase(GATHERED, [W("v", "V"), W("g", "V", "gathered")], now=0.0) == GATHERED
    assert policy.next_phase(GATHERED, [W("b", None), W("b2", None)], now=0.0) == GATHERED  # base: no merge
    assert policy.next_phase(GATHERED, [W("b", None), W("m", "V", "merged")], now=0.0) == Phase("V")
    policy.unmergeable.add("V")
    assert policy.next_phase(GATHERED, [W("m", "V", "merged")], now=0.0) == GATHERED


def test_dora_uploaded_while_another_adapter_is_merged_gives_peft_logits(demo_runtime, hf_demo_model, tmp_path_factory):
    """DoRA's norms come from W0. Uploaded during a merged phase, they must still be read from the
    weights as loaded (the frozen base), not from the merged ones (found by an outside check)."""
    from peft import LoraConfig

    from tests.peft_helpers import load_peft

    big = save_peft_adapter(
        hf_demo_model,
        LoraConfig(r=16, lora_alpha=32, target_modules=ALL_TARGETS),
        tmp_path_factory.mktemp("big-delta"),
        seed=7,
        scale=0.3,
    )
    big_version = demo_runtime.adapters.resolve(demo_runtime.adapters.upload("merged-big", *big).adapter_id)
    dora_dir = tmp_path_factory.mktemp("dora-during-merge")
    dora = save_peft_adapter(
        hf_demo_model,
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        dora_dir,
        seed=8,
    )
    manager = demo_runtime.engine.runner.adapters
    pristine(demo_runtime)
    manager.merge(big_version)
    try:
        info = demo_runtime.adapters.upload("dora-during-merge", *dora)
    finally:
        manager.restore()
        demo_runtime.adapters.cache.release(big_version)
    during_merge = demo_runtime.adapters.cache.get(info.version)
    gathered = demo_runtime.adapters.upload("dora-while-gathered", *dora)
    assert gathered.version == info.version
    for path, layer in demo_runtime.adapters.cache.get(gathered.version).layers.items():
        assert torch.equal(layer.output_scale, during_merge.layers[path].output_scale), path
    ids = torch.tensor(demo_runtime.tokenizer.encode_chat([{"role": "user", "content": "Name a planet."}]))
    with torch.no_grad():
        theirs = load_peft(hf_demo_model, dora_dir)(ids[None]).logits[0]
    ours = our_logits(pristine(demo_runtime), ids, during_merge)
    print(f"max |ours - peft| = {(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max().item() < 1e-4
