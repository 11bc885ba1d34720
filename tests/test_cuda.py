"""On a CUDA device (skipped elsewhere; scripts/gpu_check.sh runs this file in its own process): the
compiled Triton kernels against the torch references, and the engine on the GPU against the engine on
the CPU, eager and compiled.

Nothing here needs the demo model's weights or the HTTP stack (fastapi, uvicorn, pydantic), which the
GPU machines do not have.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

# scripts/gpu_check.sh --cpu runs this file on the CPU with Triton interpreted, to check that it runs at all.
DEVICE = torch.device(os.environ.get("ADAPTER_SERVER_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1",
        reason="triton is interpreted in this process (tests/kernels/test_triton_ops.py); run this file alone",
    ),
]


def _to(bufs, device):
    return dataclasses.replace(
        bufs,
        **{
            f.name: getattr(bufs, f.name).to(device)
            for f in dataclasses.fields(bufs)
            if torch.is_tensor(getattr(bufs, f.name))
        },
    )


@pytest.mark.parametrize("name", ["qkv-many-base-empty", "dora-bias-mixed", "in576-single-token", "qkv-many-bf16"])
def test_lora_kernels_on_cuda_equal_the_reference(name):
    from kernels.lora_triton import alloc_shrink_buffer, lora_apply
    from kernels.segments import build_step_meta, lora_shrink_expand_ref
    from tests.kernels.cases import LORA_CASES, close, lora_setup

    x, y0, b0, bufs, meta, dtype = lora_setup(LORA_CASES[name])
    ref = lora_shrink_expand_ref(x, y0.clone(), meta, bufs, b0)
    gbufs = _to(bufs, DEVICE)
    groups = [(g[0], g[1], g[2]) for g in LORA_CASES[name]["groups"]]
    gmeta = build_step_meta(groups, x.shape[0], meta.max_tokens, meta.max_segments, device=DEVICE)
    for form in ("segments", "tokens"):
        h = alloc_shrink_buffer(gbufs, gmeta.max_tokens)
        got = lora_apply(x.to(DEVICE), y0.clone().to(DEVICE), gbufs, gmeta, h, form, base_bias=b0.to(DEVICE))
        close(got.cpu(), ref, y0, dtype)


@pytest.mark.parametrize("name", ["r8-qkv-packed", "r13-qkv-packed-bf16"])
def test_vera_kernels_on_cuda_equal_the_reference(name):
    from kernels.shared_bases import vera_family_ref
    from kernels.shared_bases_triton import vera_apply
    from tests.kernels.cases import VERA_CASES, close, vera_setup

    x, y0, A_l, B, stack, slots, rows, _, dtype = vera_setup(VERA_CASES[name])
    ref = y0.clone()
    vera_family_ref(x, ref, rows, slots[rows].long(), A_l, B, stack)
    for attr in ("lambda_d", "lambda_b", "out_starts", "out_sizes", "active"):
        setattr(stack, attr, getattr(stack, attr).to(DEVICE))
    got = vera_apply(x.to(DEVICE), y0.clone().to(DEVICE), A_l.to(DEVICE), B.to(DEVICE), stack, slots.to(DEVICE))
    close(got.cpu(), ref, y0, dtype)


@pytest.mark.parametrize("name", ["in97-out576-r13", "in64-out64-r8-bf16"])
def test_randlora_kernels_on_cuda_equal_the_reference(name):
    from kernels.shared_bases import randlora_family_ref
    from kernels.shared_bases_triton import randlora_apply
    from tests.kernels.cases import RANDLORA_CASES, close, randlora_setup

    c = RANDLORA_CASES[name]
    gen, dtype, A_l, V, stack, pieces = randlora_setup(c)
    x = torch.randn(len(c["slots"]), c["in_f"], generator=gen).to(dtype)
    y0 = torch.randn(len(c["slots"]), 7 + c["out"] + 5, generator=gen).to(dtype)
    slots = torch.tensor(c["slots"], dtype=torch.int32)
    rows = torch.nonzero(slots >= 0).flatten()
    members = [(slice(i, i + 1), pieces[int(slots[row])]) for i, row in enumerate(rows.tolist())]
    ref = y0.clone()
    randlora_family_ref(x, ref[:, 7 : 7 + c["out"]], rows, members, V)
    gstack = dataclasses.replace(
        stack, lam=stack.lam.to(DEVICE), gamma=stack.gamma.to(DEVICE), scales=stack.scales.to(DEVICE)
    )
    got = randlora_apply(
        x.to(DEVICE), y0.clone().to(DEVICE), A_l.to(DEVICE), V.to(DEVICE), gstack, slots.to(DEVICE), out_start=7
    )
    close(got.cpu(), ref, y0, dtype, delta_eps=3)


# ---- the engine on the GPU ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with peaked next-token distributions (see tests/test_compile_decode.py) and a
    word-level tokenizer: the GPU machines have no demo model to borrow a tokenizer from."""
    from benchmarks.random_model import write_tokenizer
    from tests.conftest import SHARP_LLAMA, build_tiny_llama

    path = build_tiny_llama(tmp_path_factory.mktemp("sharp"), **SHARP_LLAMA)
    return write_tokenizer(path, 49152)


def _engine_run(model_dir: Path, adapters_dir: Path, device: str, compile: bool, backend: str | None = None):
    from server.config import AdapterConfig, EngineConfig, ServerConfig
    from server.runtime import BACKEND_ENV, build_runtime
    from tests.conftest import drive
    from tests.test_compile_decode import ADAPTERS, _lora, _requests

    if backend is not None:
        os.environ[BACKEND_ENV] = backend
    try:
        runtime = build_runtime(
            ServerConfig(
                model=model_dir,
                device=device,
                dtype="float32",
                adapters_dir=adapters_dir,
                engine=EngineConfig(max_model_len=256, max_num_seqs=8, kv_cache_gb=0.05, compile=compile),
                adapters=AdapterConfig(max_slots=4),
            )
        )
    finally:
        os.environ.pop(BACKEND_ENV, None)
    for i, (name, (rank, targets, dora, bias)) in enumerate(ADAPTERS.items()):
        runtime.adapters.upload(name, *_lora(runtime, rank, targets, seed=i, dora=dora, bias=bias))
    requests = _requests(runtime)
    drive(runtime, {0: [r for r, _ in requests[:5]], 3: [r for r, _ in requests[5:]]})
    return runtime, [sink for _, sink in requests]


@pytest.mark.parametrize(("backend", "compile"), [("triton", False), ("torch", False), ("torch", True)])
def test_engine_on_cuda_gives_the_cpu_tokens(sharp_model_dir, tmp_path, backend, compile):
    """fp32 on both devices (TF32 is off by default): greedy tokens identical, logprobs within 1e-3. The
    Triton kernels eagerly, the torch path eagerly, and the compiled decode step with token-form LoRA
    (the Triton backend's LoRA steps are never compiled: its slots have no token-form mirror)."""
    _, cpu = _engine_run(sharp_model_dir, tmp_path / "cpu", "cpu", compile=False)
    runtime, gpu = _engine_run(sharp_model_dir, tmp_path / "gpu", str(DEVICE), compile=compile, backend=backend)
    assert runtime.engine.runner.adapters.backend == backend
    if compile:
        assert runtime.engine.runner.fused is not None and runtime.engine.runner.fused.steps > 0
    for ours, ref in zip(gpu, cpu):
        assert ours.token_ids == ref.token_ids
        a = [lp.logprob for e in ours.events for lp in (e.logprobs or [])]
        b = [lp.logprob for e in ref.events for lp in (e.logprobs or [])]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
