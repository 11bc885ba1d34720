"""The compiled decode step (server/model/fused_decode.py) against the eager model, the exactness reference.

Compilation changes rounding only: attention and norms reduce in inductor's order (fp32 for every
dtype) and the token-form LoRA folds the scale per column. Bound, float32, on a tiny random Llama with
a mix of LoRA, DoRA, lora-bias and base rows: |logits compiled − eager| ≤ 1e-4 (measured ~1e-6), and
greedy tokens identical through the engine. One compilation per module (two variants), ~10-30 s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.runtime import Runtime, build_runtime
from tests.conftest import SHARP_LLAMA, build_tiny_llama, drive, make_request

BOUND = 1e-4


def _lora(runtime: Runtime, rank: int, targets: list[str], seed: int, dora: bool = False, bias: bool = False):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for linear in runtime.model.adapted_linears():
        for s in linear.slices:
            if s.path.rsplit(".", 1)[-1] in targets:
                key = f"base_model.model.{s.path}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=gen) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(s.out_features, rank, generator=gen) * 0.3
                if bias:
                    tensors[f"{key}.lora_B.bias"] = torch.randn(s.out_features, generator=gen) * 0.1
                if dora:
                    w0 = linear.weight[s.out_start : s.out_start + s.out_features]
                    tensors[f"{key}.lora_magnitude_vector"] = w0.norm(dim=1) * (
                        1.1 + 0.1 * torch.rand(s.out_features, generator=gen)
                    )
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "bias": "none",
        "use_dora": dora,
        "lora_bias": bias,
    }
    return json.dumps(config).encode(), save(tensors)


ADAPTERS = {  # name -> (rank, targets, dora, lora bias)
    "qkvo-r4": (4, ["q_proj", "k_proj", "v_proj", "o_proj"], False, False),
    "all7-r20": (20, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False, False),
    "dora-qv": (6, ["q_proj", "v_proj", "down_proj"], True, False),
    "bias-o": (3, ["o_proj", "up_proj"], False, True),
}


def _runtime(model_dir, adapters_dir, compile: bool) -> Runtime:
    config = ServerConfig(
        model=model_dir,
        dtype="float32",
        adapters_dir=adapters_dir,
        engine=EngineConfig(
            max_model_len=256, max_num_seqs=8, max_batched_tokens=256, kv_cache_gb=0.05, compile=compile
        ),
        adapters=AdapterConfig(max_slots=4),
    )
    runtime = build_runtime(config)
    for i, (name, (rank, targets, dora, bias)) in enumerate(ADAPTERS.items()):
        runtime.adapters.upload(name, *_lora(runtime, rank, targets, seed=i, dora=dora, bias=bias))
    return runtime


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_served_model_dir, tmp_path_factory) -> Path:
    """The tiny served model's shapes and tokenizer with larger random weights (`SHARP_LLAMA`)."""
    path = build_tiny_llama(tmp_path_factory.mktemp("sharp"), **SHARP_LLAMA)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tiny_served_model_dir / name).exists():
            shutil.copy(tiny_served_model_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def pair(sharp_model_dir, tmp_path_factory):
    compiled = _runtime(sharp_model_dir, tmp_path_factory.mktemp("compiled"), compile=True)
    eager = _runtime(sharp_model_dir, tmp_path_factory.mktemp("eager"), compile=False)
    return compiled, eager


def _requests(runtime: Runtime, max_tokens: int = 24):
    """Eight requests: every adapter and the base model, prompts of different lengths (so B and the
    context length both change as they finish)."""
    names = [*ADAPTERS, None, "qkvo-r4", None, "dora-qv", "all7-r20"][:8]
    out = []
    for i, name in enumerate(names):
        prompt = [(13 * i + 7 * j) % 4000 + 10 for j in range(5 + 9 * i)]
        request, sink = make_request(f"r{i}", prompt, max_tokens=max_tokens - 2 * i, ignore_eos=True, logprobs=1)
        request.adapter_version = None if name is None else runtime.adapters.resolve(name)
        out.append((request, sink))
    return out


def test_compiled_engine_gives_the_eager_greedy_tokens_and_logprobs_within_bound(pair):
    compiled, eager = pair
    fused = compiled.engine.runner.fused
    assert fused is not None and fused.report.variants == ["base", "lora q,k,v,o", "lora all"]
    runs = {}
    for name, runtime in (("compiled", compiled), ("eager", eager)):
        requests = _requests(runtime)
        drive(runtime, {0: [r for r, _ in requests[:5]], 3: [r for r, _ in requests[5:]]})
        runs[name] = [sink for _, sink in requests]
    assert fused.steps > 10, "decode-only steps must have run compiled"
    for ours, ref in zip(runs["compiled"], runs["eager"]):
        assert ours.token_ids == ref.token_ids
        a = [lp.logprob for e in ours.events for lp in (e.logprobs or [])]
        b = [lp.logprob for e in ref.events for lp in (e.logprobs or [])]
        assert max(abs(x - y) for x, y in zip(a, b)) < BOUND


def test_compiled_step_logits_within_bound_of_the_eager_model_and_never_recompile(pair):
    compiled, _ = pair
    runner = compiled.engine.runner
    captured = []
    prepare = runner.prepare
    runner.prepare = lambda batch: captured.append(prepare(batch)) or captured[-1]
    try:
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        drive(compiled, {0: [r for r, _ in _requests(compiled, max_tokens=12)]})
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before, "a step recompiled"
    finally:
        runner.prepare = prepare
    decodes = [c for c in captured if runner.fused.supports(c)]
    assert decodes and any(c.adapters is not None for c in decodes) and any(c.num_decode == 1 for c in decodes)
    kv = runner.kv_cache
    with torch.inference_mode():
        for ctx in decodes[-3:]:  # the last steps' KV rows are still the sequences' own (none was reused)
            assert (runner.fused(ctx) - compiled.model(ctx, kv.keys, kv.values)).abs().max().item() < BOUND
