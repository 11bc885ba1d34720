"""Mixed-adapter batches, hot swap, delete, restart and slot pressure on the real SmolLM2 engine."""

from __future__ import annotations

import pytest

from adapters_store import DEFAULT_TENANT
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.runtime import build_runtime
from tests.conftest import drive, make_request
from tests.peft_helpers import ALL_TARGETS, save_peft_adapter, train_adalora


@pytest.fixture(scope="module")
def adapter_files(hf_demo_model, tmp_path_factory):
    """Five adapters of different kinds and ranks: name -> (config bytes, weights bytes)."""
    from peft import LoraConfig

    configs = {
        "lora-r4-qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "lora-r16-qkvo": LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "rslora-r8-all": LoraConfig(r=8, lora_alpha=6, use_rslora=True, target_modules=ALL_TARGETS),
        "dora-r2-mlp": LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["gate_proj", "down_proj"]),
    }
    files = {
        name: save_peft_adapter(hf_demo_model, cfg, tmp_path_factory.mktemp(name), seed=40 + i, scale=0.06)
        for i, (name, cfg) in enumerate(configs.items())
    }
    files["adalora"] = train_adalora(hf_demo_model, tmp_path_factory.mktemp("adalora-mix"), steps=4)
    return files


@pytest.fixture(scope="module")
def uploaded(demo_runtime, adapter_files):
    return {name: demo_runtime.adapters.upload(f"mix-{name}", *files) for name, files in adapter_files.items()}


def _ids(runtime, text: str) -> list[int]:
    return runtime.tokenizer.encode_chat([{"role": "user", "content": text}])


def _request(runtime, rid: str, adapter_id: str | None, text: str, max_tokens: int = 10, mode: str = "auto"):
    request, sink = make_request(rid, _ids(runtime, text), max_tokens=max_tokens, ignore_eos=True)
    request.adapter_version = None if adapter_id is None else runtime.adapters.resolve(adapter_id)
    request.mode = mode
    return request, sink


def _alone(runtime, adapter_id: str | None, text: str, max_tokens: int = 10) -> list[int]:
    request, sink = _request(runtime, "alone", adapter_id, text, max_tokens)
    drive(runtime, {0: [request]})
    return sink.token_ids


def test_mixed_batch_rows_equal_each_request_alone(demo_runtime, uploaded):
    jobs = (
        [(None, "What is rain?")]
        + [(info.adapter_id, f"Describe item {i}.") for i, info in enumerate(uploaded.values())]
        + [(None, "Hello!"), (uploaded["lora-r4-qv"].adapter_id, "Why?")]
    )
    expected = [_alone(demo_runtime, adapter_id, text) for adapter_id, text in jobs]
    assert len({tuple(e) for e in expected}) == len(expected)
    schedule: dict[int, list] = {}
    sinks = []
    for i, (adapter_id, text) in enumerate(jobs):  # admitted at different steps: prefills meet decodes
        request, sink = _request(demo_runtime, f"mix{i}", adapter_id, text)
        schedule.setdefault(i % 3, []).append(request)
        sinks.append(sink)
    drive(demo_runtime, schedule)
    assert [s.token_ids for s in sinks] == expected


def test_adapter_changes_output_versus_base(demo_runtime, uploaded):
    text = "Describe item 0."
    assert _alone(demo_runtime, uploaded["lora-r16-qkvo"].adapter_id, text) != _alone(demo_runtime, None, text)


def test_hot_swap_mid_stream_keeps_old_weights_for_running_request(demo_runtime, adapter_files):
    service = demo_runtime.adapters
    v1 = service.upload("swap", *adapter_files["lora-r4-qv"]).version
    old_alone = _alone(demo_runtime, "swap", "Tell me a story.", 12)
    old, old_sink = _request(demo_runtime, "old", "swap", "Tell me a story.", 12)
    engine = demo_runtime.engine
    engine.admit(old)
    for _ in range(4):
        engine.step()
    v2 = service.upload("swap", *adapter_files["lora-r16-qkvo"]).version
    assert v2 != v1 and service.get("swap").version == v2
    new, new_sink = _request(demo_runtime, "new", "swap", "Tell me a story.", 12)
    drive(demo_runtime, {0: [new]})
    assert old_sink.token_ids == old_alone  # finished on the version it started with
    assert new_sink.token_ids == _alone(demo_runtime, "swap", "Tell me a story.", 12)
    assert new_sink.token_ids != old_sink.token_ids
    assert service.stores.store(DEFAULT_TENANT).versions("swap") == [v2]  # the old version's files are gone


def test_delete_while_running_finishes_then_404(demo_runtime, adapter_files):
    from adapters_store import AdapterNotFound

    service = demo_runtime.adapters
    service.upload("doomed", *adapter_files["rslora-r8-all"])
    expected = _alone(demo_runtime, "doomed", "Count to five.")
    request, sink = _request(demo_runtime, "doomed-run", "doomed", "Count to five.")
    demo_runtime.engine.admit(request)
    demo_runtime.engine.step()
    service.delete("doomed")
    drive(demo_runtime, {})
    assert sink.token_ids == expected
    with pytest.raises(AdapterNotFound):
        service.resolve("doomed")
    assert "doomed" not in service.stores.store(DEFAULT_TENANT).scan()


def test_adapter_slot_pressure_makes_requests_wait_not_mix_weights(demo_model_dir, uploaded, demo_runtime, tmp_path):
    small = build_runtime(
        ServerConfig(
            model=demo_model_dir,
            dtype="float32",
            adapters_dir=tmp_path,
            engine=EngineConfig(max_model_len=256, max_num_seqs=6, kv_cache_gb=0.3),
            adapters=AdapterConfig(max_slots=2),
        )
    )
    names = ["lora-r4-qv", "lora-r16-qkvo", "rslora-r8-all", "dora-r2-mlp"]
    for name in names:
        store = demo_runtime.adapters.stores.store(DEFAULT_TENANT)
        files = store.read(uploaded[name].adapter_id, uploaded[name].version)
        small.adapters.upload(name, files["adapter_config.json"], files["adapter_model.safetensors"])
    expected = [_alone(small, name, "Say hi.", 6) for name in names]
    pairs = [_request(small, f"p{i}", name, "Say hi.", 6, mode="gathered") for i, name in enumerate(names)]
    engine = small.engine
    for request, _ in pairs:
        engine.admit(request)
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2  # 2 slots, 4 adapters
    drive(small, {})
    assert [sink.token_ids for _, sink in pairs] == expected


def test_restart_re_registers_adapters_and_cleans_partial_uploads(demo_model_dir, adapter_files, tmp_path):
    config = ServerConfig(
        model=demo_model_dir,
        dtype="float32",
        adapters_dir=tmp_path,
        engine=EngineConfig(max_model_len=256, max_num_seqs=2, kv_cache_gb=0.2),
    )
    first = build_runtime(config)
    info = first.adapters.upload("keeper", *adapter_files["dora-r2-mlp"])
    expected = _alone(first, "keeper", "What is snow?")
    killed = tmp_path / DEFAULT_TENANT / ".tmp-killedupload"  # what kill -9 mid-upload leaves
    killed.mkdir()
    (killed / "adapter_model.safetensors").write_bytes(b"half")
    del first
    second = build_runtime(config)
    assert second.adapters.get("keeper").version == info.version
    assert not killed.exists()
    assert _alone(second, "keeper", "What is snow?") == expected
