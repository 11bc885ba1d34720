"""Workloads shared by the benchmarks: prompts, random PEFT adapter files, and an engine run."""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from server.engine.request import Request, SamplingParams
from server.runtime import Runtime

TOPICS = [
    "bread",
    "rivers",
    "clocks",
    "paper",
    "bridges",
    "music",
    "salt",
    "maps",
    "glass",
    "tea",
    "iron",
    "wool",
    "ships",
    "roads",
    "bees",
    "stone",
]


def prompts(runtime: Runtime, n: int, length: int = 32) -> list[list[int]]:
    """n distinct prompts of exactly `length` tokens."""
    text = "Please write a detailed paragraph about the history of {} and why it matters to people today."
    return [(runtime.tokenizer.encode(text.format(TOPICS[i % len(TOPICS)])) * 4)[:length] for i in range(n)]


def lora_files(
    runtime: Runtime, rank: int, targets: list[str], seed: int, scale: float = 0.02, dora: bool = False
) -> tuple[bytes, bytes]:
    """A PEFT-format LoRA (or DoRA) adapter (config + safetensors bytes) with random trained-looking factors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for linear in runtime.model.adapted_linears():
        for s in linear.slices:
            if s.path.rsplit(".", 1)[-1] in targets:
                key = f"base_model.model.{s.path}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g) * scale
                tensors[f"{key}.lora_B.weight"] = torch.randn(s.out_features, rank, generator=g) * scale
                if dora:  # magnitudes near the row norms of W0, as after a little training
                    w0 = linear.weight[s.out_start : s.out_start + s.out_features].float()
                    noise = 1 + 0.05 * torch.randn(s.out_features, generator=g)
                    tensors[f"{key}.lora_magnitude_vector"] = w0.norm(dim=1) * noise
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "use_dora": dora,
    }
    return json.dumps(config).encode(), save(tensors, metadata={"format": "pt"})


def _targeted(runtime: Runtime, targets: list[str]):
    for linear in runtime.model.adapted_linears():
        for s in linear.slices:
            if s.path.rsplit(".", 1)[-1] in targets:
                yield f"base_model.model.{s.path}", s.out_features, linear.in_features


def vera_files(runtime: Runtime, rank: int, targets: list[str], key: int, seed: int) -> tuple[bytes, bytes]:
    """A PEFT-format VeRA adapter (save_projection=false: only its vectors) with random trained values."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, out_f, _ in _targeted(runtime, targets):
        tensors[f"{prefix}.vera_lambda_d"] = torch.randn(rank, generator=g) * 0.1
        tensors[f"{prefix}.vera_lambda_b"] = torch.randn(out_f, generator=g) * 0.1
    config = {
        "peft_type": "VERA",
        "r": rank,
        "target_modules": targets,
        "projection_prng_key": key,
        "save_projection": False,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    return json.dumps(config).encode(), save(tensors, metadata={"format": "pt"})


def randlora_files(runtime: Runtime, rank: int, targets: list[str], key: int, seed: int) -> tuple[bytes, bytes]:
    """A PEFT-format RandLoRA adapter (dense bases, save_projection=false) with random trained values."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, out_f, in_f in _targeted(runtime, targets):
        min_l = min(out_f, in_f)
        num_bases = -(-min_l // rank)
        tensors[f"{prefix}.randlora_lambda"] = torch.randn(rank, num_bases, generator=g) * 0.01
        tensors[f"{prefix}.randlora_gamma"] = torch.randn(num_bases, min_l, generator=g) * 0.01
    config = {
        "peft_type": "RANDLORA",
        "r": rank,
        "randlora_alpha": 2 * rank,
        "target_modules": targets,
        "projection_prng_key": key,
        "save_projection": False,
        "sparse": False,
        "very_sparse": False,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    return json.dumps(config).encode(), save(tensors, metadata={"format": "pt"})


def write_adapter_dir(path: Path, config_bytes: bytes, weights: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_bytes(config_bytes)
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


class TokenClock:
    """Event sink factory that timestamps each request's first token and its end."""

    def __init__(self, expected: int) -> None:
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.expected = expected
        self.all_done = threading.Event()

    def sink(self, rid: str):
        def emit(event) -> None:
            now = time.perf_counter()
            self.first.setdefault(rid, now)
            if event.finish_reason is not None:
                self.done[rid] = now
                if len(self.done) == self.expected:
                    self.all_done.set()

        return emit


@dataclass(slots=True)
class RunResult:
    tok_s: float
    ttft: float  # mean seconds from submit to first token
    tpot: float  # mean seconds between a request's output tokens
    decode_step: float  # median seconds of a step where every request decodes


def run_engine(
    runtime: Runtime,
    batch: list[list[int]],
    new_tokens: int,
    adapter_ids: list[str | None] | None = None,
    mode: str = "gathered",
) -> RunResult:
    """Submit the whole batch at once, step the engine by hand until done."""
    engine = runtime.engine
    clock = TokenClock(len(batch))
    first, done = clock.first, clock.done
    start = time.perf_counter()
    for i, ids in enumerate(batch):
        adapter_id = adapter_ids[i] if adapter_ids else None
        version = None if adapter_id is None else runtime.adapters.resolve(adapter_id)
        engine.admit(
            Request(
                f"b{i}",
                ids,
                SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                emit=clock.sink(f"b{i}"),
                adapter_version=version,
                arrival_time=start,
                mode=mode,
            )
        )
    decode_steps = []
    while engine.scheduler.has_work():
        pure_decode = not engine.scheduler.waiting and all(not s.in_prefill for s in engine.scheduler.running)
        t0 = time.perf_counter()
        engine.step()
        if pure_decode and len(engine.scheduler.running) == len(batch):
            decode_steps.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return RunResult(
        tok_s=len(batch) * new_tokens / wall,
        ttft=statistics.mean(first[r] - start for r in first),
        tpot=statistics.mean((done[r] - first[r]) / (new_tokens - 1) for r in done),
        decode_step=statistics.median(decode_steps) if decode_steps else float("nan"),
    )
