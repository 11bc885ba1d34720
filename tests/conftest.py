"""Shared fixtures: the real demo model, a tiny random Llama, and engines driven step by step."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from server.config import EngineConfig, ServerConfig
from server.demo_model import DEMO_MODEL_DIR, is_complete_model_dir
from server.engine.request import Request, SamplingParams, TokenEvent
from server.runtime import Runtime, build_runtime


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    if not is_complete_model_dir(DEMO_MODEL_DIR):
        pytest.fail(f"demo model missing at {DEMO_MODEL_DIR}: run `make setup`")
    return DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def demo_runtime(demo_model_dir: Path, tmp_path_factory) -> Runtime:
    """float32 SmolLM2 runtime whose engine is driven by hand (never started as a thread)."""
    config = ServerConfig(
        model=demo_model_dir,
        dtype="float32",
        adapters_dir=tmp_path_factory.mktemp("adapters"),
        engine=EngineConfig(max_model_len=512, max_num_seqs=8, max_batched_tokens=256, kv_cache_gb=1.0),
    )
    return build_runtime(config)


@pytest.fixture(scope="session")
def hf_demo_model(demo_model_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()


class Collector:
    """Captures a request's events as the engine emits them."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None


def make_request(request_id: str, prompt_ids: list[int], **params) -> tuple[Request, Collector]:
    sink = Collector()
    params.setdefault("max_tokens", 16)
    return Request(request_id, prompt_ids, SamplingParams(**params), emit=sink, arrival_time=time.perf_counter()), sink


def drive(runtime: Runtime, schedule: dict[int, list[Request]], max_steps: int = 2000) -> None:
    """Run the engine by hand: requests in schedule[k] are admitted before step k."""
    engine = runtime.engine
    step, admitted = 0, -1
    while step < max_steps:
        if admitted < step:  # a step that could not run yet (merged phase, adapter loading) is retried
            for request in schedule.get(step, []):
                engine.admit(request)
            admitted = step
        if not engine.scheduler.has_work() and step > max(schedule, default=0):
            return
        if engine.step() or not engine.scheduler.has_work():
            step += 1
        else:
            time.sleep(0.001)  # all work held back (merged phase) or loading: wall time must pass
    raise AssertionError("engine did not finish in time")


SHARP_LLAMA = dict(initializer_range=0.2, vocab_size=49152, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
"""`build_tiny_llama` overrides for a model with the demo tokenizer's vocabulary and larger random weights:
its next-token distributions are peaked (logit std ~1.6), so greedy choices are not near-ties that
rounding flips (the default init gives nearly uniform logits over 49k tokens, top-2 gaps ~1e-4)."""


def build_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """A random Llama-family checkpoint directory (weights only) for exactness tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    with torch.no_grad():  # make biases (when present) non-trivial
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_served_model_dir(demo_model_dir: Path, tmp_path_factory) -> Path:
    """A random two-layer Llama with the demo model's tokenizer and chat template: a server on it
    answers in milliseconds, for tests that send many requests (hostile input, fuzzing)."""
    import shutil

    path = build_tiny_llama(
        tmp_path_factory.mktemp("tiny-served"),
        vocab_size=49152,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=512,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (demo_model_dir / name).exists():
            shutil.copy(demo_model_dir / name, path / name)
    return path
