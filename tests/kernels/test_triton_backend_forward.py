"""The Triton backend, wired through AdapterManager, equals the torch backend on a whole forward pass.

A tiny random Llama (with biases, so DoRA's base-bias term and lora_bias are exercised) runs one prefill
whose rows use LoRA (+bias), DoRA, rsLoRA of rank 80 (> the slot buffers' initial 64: they grow, copying
the slots loaded before), VeRA, RandLoRA and the base model, interleaved, in the segment form (prefill)
and the per-token form (decode-only steps), the second reusing the step buffers the first sized; then
the whole engine generates the same greedy tokens on both backends for staggered requests of those
adapters, so decode-only steps (token form) and prefill steps (segment form) both run. The
triton side runs under
Triton's interpreter, which must be on before triton is first imported in a process; this pytest process
may already hold a compiled triton, so the comparison runs in a fresh subprocess (`python -m` this module)
with TRITON_INTERPRET=1 and ADAPTER_SERVER_KERNEL_BACKEND=triton. Nothing here imports triton itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from kernels.slot_store import LoraSlotStore
from tests.kernels.helpers import adapter

ROOT = Path(__file__).resolve().parents[2]


def test_triton_backend_forward_equals_torch_backend(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "ADAPTER_SERVER_KERNEL_BACKEND": "triton"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_triton_backend_forward", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "EQUAL" in done.stdout, done.stdout[-2000:]


def test_slot_store_grows_and_keeps_loaded_slots():
    """A rank above the initial 64 (or a first DoRA/bias adapter) reallocates without losing other slots."""

    class Layer:
        key, in_features = "l", 16
        slices = [
            type("S", (), {"out_start": 0, "out_features": 8})(),
            type("S", (), {"out_start": 8, "out_features": 4})(),
        ]

    gen = torch.Generator().manual_seed(0)
    store = LoraSlotStore([Layer()], num_slots=3, dtype=torch.float32, device="cpu")
    small = adapter([(0, 8), (8, 4)], 16, 8, gen)
    store.write(0, {"l": small})
    first = store.get("l")
    assert first.max_rank == 64 and first.g_buf is None
    big = adapter([(0, 8)], 16, 80, gen, dora=True)
    store.write(2, {"l": big})
    grown = store.get("l")
    assert grown.max_rank == 128 and grown.g_buf is not None
    assert torch.equal(grown.A_buf[0, 0, :8], small.slices[0].A) and grown.slot_ranks[:, 0].tolist() == [8, 8]
    assert grown.slot_ranks[:, 2].tolist() == [80, 0] and torch.equal(grown.g_buf[0], torch.ones(12))
    store.write(0, {})
    assert grown.slot_ranks[:, 0].tolist() == [0, 0] and not grown.A_buf[:, 0].any()
    store.clear(2)
    assert not grown.slot_ranks.any() and torch.equal(grown.g_buf, torch.ones_like(grown.g_buf))


# ------------------------------------------------------------------------------ the subprocess side
def _manager(model, parsed: dict, backend: str):
    """An AdapterManager with adapter i of `parsed` loaded into slot i."""
    from server.adapters.frozen_base import FrozenBase
    from server.adapters.host_cache import HostCache
    from server.adapters.manager import AdapterManager
    from server.adapters.slot_table import SlotTable

    cache = HostCache(max_bytes=2**40)
    table = SlotTable(max(len(parsed), 1))
    for name, adapter_ in parsed.items():  # slot i = i-th adapter, loaded in this order
        cache.put(name, adapter_)
        table.acquire(name)
    linears = model.adapted_linears()
    manager = AdapterManager(
        table, cache, linears, FrozenBase.capture(linears), torch.float32, backend=backend, max_step_tokens=64
    )
    manager.load_pending()
    return manager


def _forward(model, ids: torch.Tensor, manager, groups: list, decode_only: bool = False) -> torch.Tensor:
    """Logits of every row of one step whose rows use `groups` [(adapter name | None, start, end)]. The
    adapter math does not depend on how attention sees the rows, so one prefill segment carries them;
    `decode_only` only picks the per-token kernel form."""
    from kernels.batch import TokenGroup
    from server.model.context import ForwardContext

    table = manager.table
    plan = manager.plan(
        [TokenGroup(table.slot_of(name), start, end) for name, start, end in groups if name is not None],
        len(ids),
        decode_only,
    )
    cfg, n = model.config, len(ids)
    keys = [torch.zeros(n, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    values = [torch.zeros_like(k) for k in keys]
    ctx = ForwardContext.prefills_only([ids], plan)
    with torch.no_grad():
        return model(ctx, keys, values)


def main(workdir: Path) -> None:
    from peft import LoraConfig, RandLoraConfig, VeraConfig
    from transformers import LlamaForCausalLM
    from triton.runtime.interpreter import InterpretedFunction

    from adapters_store import parse_adapter
    from server.adapters.frozen_base import FrozenBase
    from server.adapters.packing import base_model_spec
    from server.model.loader import load_model
    from server.runtime import resolve_kernel_backend
    from tests.conftest import build_tiny_llama
    from tests.peft_helpers import ALL_TARGETS, save_peft_adapter

    assert resolve_kernel_backend(torch.device("cpu")) == "triton"  # forced by the env var
    model_dir = build_tiny_llama(workdir / "base", seed=11, attention_bias=True, mlp_bias=True)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    configs = {  # load order: the r=80 adapter comes after smaller ones, so the buffers grow mid-way
        "lora-bias": LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=ALL_TARGETS),
        "dora": LoraConfig(r=6, lora_alpha=12, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        "vera": VeraConfig(r=7, target_modules=ALL_TARGETS, projection_prng_key=123),
        "randlora": RandLoraConfig(r=5, target_modules=["q_proj", "o_proj", "up_proj"], projection_prng_key=9),
        "rslora-r80": LoraConfig(r=80, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "gate_proj"]),
    }
    model = load_model(model_dir, torch.float32, 64)
    spec = base_model_spec(model.adapted_linears(), FrozenBase.capture(model.adapted_linears()), 128, 2**30)
    parsed = {}
    files = {}
    for i, (name, config) in enumerate(configs.items()):
        files[name] = save_peft_adapter(hf, config, workdir / name, seed=20 + i, scale=0.2)
        parsed[name] = parse_adapter(*files[name], spec)
    groups = [
        ("lora-bias", 0, 3),
        (None, 3, 5),
        ("vera", 5, 9),
        ("dora", 9, 14),
        ("rslora-r80", 14, 17),
        ("randlora", 17, 22),
        (None, 22, 24),
        ("lora-bias", 24, 30),
        ("vera", 30, 33),
        ("dora", 33, 34),
    ]
    ids = torch.randint(0, 300, (34,), generator=torch.Generator().manual_seed(3))

    import kernels.lora_triton as lora_ops
    import kernels.shared_bases_triton as sb_ops

    base = _forward(model, ids, _manager(model, {}, "torch"), [])
    reference = _manager(model, parsed, "torch")
    ref = _forward(model, ids, reference, groups)
    manager = _manager(model, parsed, "triton")
    got = _forward(model, ids, manager, groups)
    for kernel in (lora_ops._lora_shrink_seg_kernel, sb_ops._randlora_gamma_shrink_kernel):
        assert isinstance(kernel, InterpretedFunction)
    lora = manager.store_for("lora")
    assert lora.slot_factors is None, "the Triton backend keeps no per-slot LoRA copy beside the slot buffers"
    assert max(b.max_rank for b in lora.slots.buffers.values()) == 128
    projections = [
        p
        for layers in manager.store_for("randlora").layers.values()
        for per_layer in layers.values()
        for p in per_layer.values()
    ]
    assert projections and all(p.pieces is None and p.stack is not None for p in projections), (
        "the Triton path must not materialise RandLoRA's U"
    )
    assert (ref - base).abs().max().item() > 1e-2
    for k, (name, start, end) in enumerate(groups):  # each group's own delta matters (not just via attention)
        if name is not None:
            without = _forward(model, ids, reference, groups[:k] + groups[k + 1 :])
            changed = (ref[start:end] - without[start:end]).abs().max().item()
            assert changed > 1e-3, f"{name}: rows {start}:{end} changed by {changed}"
    err = (got - ref).abs().max().item()
    print(f"max |triton - torch| = {err:.3g} (segment form)")
    assert err < 1e-4, err

    # The per-token form (what decode-only steps use) on the same rows, through the same step buffers:
    # after the first step sized them, later steps reuse them without allocating.
    buffers = manager.step_buffers
    allocations, pointers = buffers.allocations, (buffers.lora_h.data_ptr(), buffers.projection_h.data_ptr())
    got_tokens = _forward(model, ids, manager, groups, decode_only=True)
    err = (got_tokens - ref).abs().max().item()
    print(f"max |triton - torch| = {err:.3g} (token form)")
    assert err < 1e-4, err
    assert buffers.allocations == allocations
    assert (buffers.lora_h.data_ptr(), buffers.projection_h.data_ptr()) == pointers
    _engine_runs_agree(model_dir, files, workdir)
    print("EQUAL")


def _engine_runs_agree(model_dir: Path, files: dict, workdir: Path) -> None:
    """The whole engine (runner → plan → kernels, decode-only steps in the token form, prefill steps in the
    segment form) generates the same greedy tokens on both backends, staggered so steps mix phases."""
    import shutil

    import kernels.batch_triton as batch_triton
    from server.config import EngineConfig, ServerConfig
    from server.demo_model import DEMO_MODEL_DIR
    from server.runtime import BACKEND_ENV, build_runtime
    from tests.conftest import drive, make_request

    shutil.copy(DEMO_MODEL_DIR / "tokenizer.json", model_dir / "tokenizer.json")  # ids < 300 decode fine
    forms: list[str] = []
    real_apply = batch_triton.lora_apply
    batch_triton.lora_apply = lambda *a, **kw: (forms.append(a[5]), real_apply(*a, **kw))[1]
    tokens = {}
    for backend in ("torch", "triton"):
        os.environ[BACKEND_ENV] = backend
        runtime = build_runtime(
            ServerConfig(
                model=model_dir,
                dtype="float32",
                adapters_dir=workdir / f"store-{backend}",
                engine=EngineConfig(max_model_len=64, max_num_seqs=6, max_batched_tokens=64, kv_cache_gb=0.01),
            )
        )
        assert runtime.engine.runner.adapters.backend == backend
        for name, (config_bytes, weights) in files.items():
            runtime.adapters.upload(name, config_bytes, weights)
        gen = torch.Generator().manual_seed(5)
        schedule, sinks = {}, {}
        for i, name in enumerate(["lora-bias", "vera", None, "randlora", "dora", "rslora-r80"]):
            prompt = torch.randint(3, 300, (5 + i,), generator=gen).tolist()
            request, sinks[i] = make_request(f"r{i}", prompt, max_tokens=6, ignore_eos=True)
            request.adapter_version = None if name is None else runtime.adapters.resolve(name)
            request.mode = "gathered"  # the kernels, not a merged phase
            schedule.setdefault(2 * (i // 2), []).append(request)  # pairs arrive every other step
        drive(runtime, schedule)
        tokens[backend] = {i: sink.token_ids for i, sink in sinks.items()}
    print(f"engine tokens (triton): {tokens['triton']}")
    assert tokens["triton"] == tokens["torch"] and all(len(t) == 6 for t in tokens["torch"].values())
    assert {"tokens", "segments"} <= set(forms), f"forms used: {set(forms)}"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
