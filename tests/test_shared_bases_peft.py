"""VeRA and RandLoRA (seeded shared bases) against PEFT, alone and batched with everything else."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from server.model.loader import load_model
from tests.conftest import build_tiny_llama, drive, make_request
from tests.peft_helpers import ALL_TARGETS, load_peft, our_logits, pristine, save_peft_adapter

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _configs():
    from peft import RandLoraConfig, VeraConfig

    return {
        "vera-seed": VeraConfig(r=64, target_modules=QKVO, projection_prng_key=3, save_projection=False),
        "vera-saved": VeraConfig(
            r=32, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=11, save_projection=True
        ),
        "randlora-dense": RandLoraConfig(
            r=32, randlora_alpha=64, target_modules=["q_proj", "v_proj"], projection_prng_key=5, save_projection=False
        ),
        "randlora-sparse": RandLoraConfig(
            r=48,
            randlora_alpha=96,
            target_modules=["k_proj", "o_proj"],
            sparse=True,
            projection_prng_key=6,
            save_projection=True,
        ),
        "randlora-very-sparse": RandLoraConfig(
            r=32,
            randlora_alpha=32,
            target_modules=["q_proj", "down_proj"],
            very_sparse=True,
            projection_prng_key=7,
            save_projection=False,
        ),
    }


@pytest.fixture(scope="module")
def shared_adapters(demo_runtime, hf_demo_model, tmp_path_factory):
    out = {}
    for i, (name, cfg) in enumerate(_configs().items()):
        d = tmp_path_factory.mktemp(name)
        config_bytes, weights = save_peft_adapter(hf_demo_model, cfg, d, seed=60 + i, scale=0.05)
        info = demo_runtime.adapters.upload(f"sb-{name}", config_bytes, weights)
        out[name] = (info, d, (config_bytes, weights))
    return out


NAMES = list(_configs())


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_tokens_match_peft(demo_runtime, hf_demo_model, shared_adapters, name):
    info, adapter_dir, _ = shared_adapters[name]
    assert info.projection == "seed"
    peft_model = load_peft(hf_demo_model, adapter_dir)
    ids = demo_runtime.tokenizer.encode_chat([{"role": "user", "content": "Name a river."}])
    with torch.no_grad():
        theirs = peft_model(torch.tensor([ids])).logits[0]
        with peft_model.disable_adapter():
            plain = peft_model(torch.tensor([ids])).logits[0]
        expected = peft_model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=2
        )[0, len(ids) :].tolist()
    assert (theirs - plain).abs().max() > 1e-2
    version = demo_runtime.adapters.resolve(info.adapter_id)
    parsed = demo_runtime.adapters.cache.get(version)
    demo_runtime.adapters.cache.release(version)
    assert (our_logits(pristine(demo_runtime), torch.tensor(ids), parsed) - theirs).abs().max() < 1e-4
    if 2 in expected:
        expected = expected[: expected.index(2) + 1]
    request, sink = make_request("sb-greedy", ids, max_tokens=10)
    request.adapter_version = demo_runtime.adapters.resolve(info.adapter_id)
    drive(demo_runtime, {0: [request]})
    assert sink.token_ids == expected


def test_vera_is_stored_as_vectors(demo_runtime, shared_adapters, hf_demo_model, tmp_path):
    from peft import LoraConfig

    info, _, (_, uploaded) = shared_adapters["vera-saved"]
    assert info.bytes < len(uploaded) / 2, "save_projection=true projections must be dropped"
    lora = demo_runtime.adapters.upload(
        "sb-lora-r16",
        *save_peft_adapter(
            hf_demo_model, LoraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]), tmp_path, seed=1
        ),
    )
    assert info.bytes * 10 <= lora.bytes


def test_tampered_projections_are_served_as_stored(demo_runtime, hf_demo_model, shared_adapters, tmp_path):
    _, _, (config_bytes, weights) = shared_adapters["vera-saved"]
    tensors = load(weights)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 1.5
    (tmp_path / "adapter_config.json").write_bytes(config_bytes)
    (tmp_path / "adapter_model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    info = demo_runtime.adapters.upload(
        "sb-tampered", config_bytes, (tmp_path / "adapter_model.safetensors").read_bytes()
    )
    assert info.projection == "stored"
    ids = torch.tensor(demo_runtime.tokenizer.encode_chat([{"role": "user", "content": "Name a river."}]))
    with torch.no_grad():
        theirs = load_peft(hf_demo_model, tmp_path)(ids[None]).logits[0]
    version = demo_runtime.adapters.resolve("sb-tampered")
    parsed = demo_runtime.adapters.cache.get(version)
    demo_runtime.adapters.cache.release(version)
    assert (our_logits(pristine(demo_runtime), ids, parsed) - theirs).abs().max() < 1e-4


def test_everything_in_one_batch_equals_alone(demo_runtime, shared_adapters, hf_demo_model, tmp_path):
    from peft import LoraConfig, VeraConfig

    vera2 = demo_runtime.adapters.upload(
        "sb-vera-other",
        *save_peft_adapter(
            hf_demo_model,
            VeraConfig(r=16, target_modules=QKVO, projection_prng_key=3, save_projection=False),
            tmp_path / "v2",
            seed=99,
            scale=0.05,
        ),
    )  # same seed, other rank: a different family
    lora = demo_runtime.adapters.upload(
        "sb-lora-mix",
        *save_peft_adapter(
            hf_demo_model, LoraConfig(r=8, target_modules=ALL_TARGETS), tmp_path / "l", seed=98, scale=0.05
        ),
    )
    adapter_ids = [
        None,
        "sb-vera-seed",
        vera2.adapter_id,
        "sb-vera-saved",
        "sb-randlora-dense",
        "sb-randlora-sparse",
        lora.adapter_id,
        None,
        "sb-vera-seed",
        "sb-randlora-very-sparse",
    ]

    def req(i, adapter_id):
        ids = demo_runtime.tokenizer.encode_chat([{"role": "user", "content": f"Tell me fact {i}."}])
        request, sink = make_request(f"sb{i}", ids, max_tokens=8, ignore_eos=True)
        request.adapter_version = None if adapter_id is None else demo_runtime.adapters.resolve(adapter_id)
        return request, sink

    expected = []
    for i, adapter_id in enumerate(adapter_ids):
        request, sink = req(i, adapter_id)
        drive(demo_runtime, {0: [request]})
        expected.append(sink.token_ids)
    pairs = [req(i, a) for i, a in enumerate(adapter_ids)]
    drive(demo_runtime, {0: [p[0] for p in pairs[::2]], 1: [p[0] for p in pairs[1::2]]})
    assert [sink.token_ids for _, sink in pairs] == expected


@pytest.mark.parametrize("kind", ["vera", "randlora"])
def test_one_family_adapters_with_different_targets(demo_runtime, hf_demo_model, tmp_path, kind):
    """Same seed, rank and projection shapes but different target modules: one family. A step holding only
    one adapter's tokens, while the other sits in a slot, must skip the projections only the other adapts
    (and still equal PEFT)."""
    from peft import RandLoraConfig, VeraConfig

    make = (
        (lambda targets: VeraConfig(r=16, target_modules=targets, projection_prng_key=21))
        if kind == "vera"
        else (lambda targets: RandLoraConfig(r=16, randlora_alpha=32, target_modules=targets, projection_prng_key=21))
    )
    infos, dirs = {}, {}
    for i, targets in enumerate([["q_proj"], ["o_proj"]]):
        dirs[i] = tmp_path / f"{kind}-{i}"
        infos[i] = demo_runtime.adapters.upload(
            f"fam-{kind}-{i}", *save_peft_adapter(hf_demo_model, make(targets), dirs[i], seed=60 + i, scale=0.05)
        )
    assert infos[0].family == infos[1].family, "the two must share one projection family"
    ids = demo_runtime.tokenizer.encode_chat([{"role": "user", "content": "Name a mountain."}])

    def run(adapters: list[int]) -> list[list[int]]:
        pairs = []
        for k, i in enumerate(adapters):
            request, sink = make_request(f"fam{kind}{k}{len(adapters)}", ids, max_tokens=6, ignore_eos=True)
            request.adapter_version = demo_runtime.adapters.resolve(infos[i].adapter_id)
            request.mode = "gathered"
            pairs.append((request, sink))
        drive(demo_runtime, {0: [request for request, _ in pairs]})
        return [sink.token_ids for _, sink in pairs]

    both = run([0, 1])  # loads both into slots
    only_second = run([1])  # the first stays in its slot; the step has only o_proj's adapter
    peft_model = load_peft(hf_demo_model, dirs[1])
    with torch.no_grad():
        expected = peft_model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=2
        )[0, len(ids) :].tolist()
    assert only_second == [expected] and both[1] == expected


@pytest.mark.parametrize("kind", ["vera", "randlora-dense", "randlora-sparse"])
def test_tiny_llama_all_targets_including_wide_inputs(tmp_path, kind):
    """down_proj has in > out: RandLoRA's other branch; VeRA slices A and B differently per layer."""
    from peft import RandLoraConfig, VeraConfig
    from transformers import LlamaForCausalLM

    from adapters_store import parse_adapter
    from server.adapters.frozen_base import FrozenBase
    from server.adapters.packing import base_model_spec

    model_dir = build_tiny_llama(tmp_path / "base", seed=8)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = {
        "vera": VeraConfig(r=7, target_modules=ALL_TARGETS, projection_prng_key=123),
        "randlora-dense": RandLoraConfig(r=7, target_modules=ALL_TARGETS, projection_prng_key=99),
        "randlora-sparse": RandLoraConfig(r=5, target_modules=ALL_TARGETS, sparse=True, projection_prng_key=3),
    }[kind]
    config_bytes, weights = save_peft_adapter(hf, config, tmp_path / "adapter", seed=4, scale=0.3)
    ours = load_model(model_dir, torch.float32, 64)
    parsed = parse_adapter(
        config_bytes,
        weights,
        base_model_spec(ours.adapted_linears(), FrozenBase.capture(ours.adapted_linears()), 64, 2**30),
    )
    ids = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = load_peft(hf, tmp_path / "adapter")(ids[None]).logits[0]
    assert (our_logits(ours, ids, parsed) - theirs).abs().max().item() < 1e-4
