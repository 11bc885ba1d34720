"""Adapter HTTP API: upload/list/get/delete, generate with adapter_id, and rejected uploads."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from server.app import create_app
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.runtime import build_runtime

pytestmark = pytest.mark.anyio
P = "base_model.model.model.layers."


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api-adapters")


@pytest.fixture(scope="module")
def app(demo_model_dir, adapters_dir):
    runtime = build_runtime(
        ServerConfig(
            model=demo_model_dir,
            dtype="float32",
            adapters_dir=adapters_dir,
            engine=EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_gb=0.3),
            adapters=AdapterConfig(max_rank=64, max_upload_mb=2),
        )
    )
    return create_app(runtime)


@pytest.fixture
async def client(app):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            yield c


def lora_config(**overrides) -> dict:
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    config.update(overrides)
    return config


def lora_tensors(rank: int = 4, seed: int = 0, layers: range = range(2)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        for proj, width in (("self_attn.q_proj", 576), ("self_attn.v_proj", 192)):
            out[f"{P}{i}.{proj}.lora_A.weight"] = torch.randn(rank, 576, generator=g) * 0.1
            out[f"{P}{i}.{proj}.lora_B.weight"] = torch.randn(width, rank, generator=g) * 0.1
    return out


def files(config: dict | bytes | None = None, tensors: dict | bytes | None = None, adapter_id: str = "good"):
    config_bytes = config if isinstance(config, bytes) else json.dumps(config or lora_config()).encode()
    weights = tensors if isinstance(tensors, bytes) else save(tensors or lora_tensors())
    return {"adapter_id": adapter_id}, {
        "config": ("adapter_config.json", config_bytes),
        "weights": ("adapter_model.safetensors", weights),
    }


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


async def test_upload_list_get_generate_delete(client):
    data, upload = files(adapter_id="api-lora")
    r = await client.post("/adapters", data=data, files=upload)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["adapter_id"] == "api-lora" and body["kind"] == "lora" and body["rank"] == 4
    assert body["target_modules"] == ["q_proj", "v_proj"] and body["num_layers"] == 4 and body["bytes"] > 0
    assert len(body["version"]) == 16
    listed = (await client.get("/adapters")).json()["adapters"]
    assert [a["adapter_id"] for a in listed] == ["api-lora"]
    assert (await client.get("/adapters/api-lora")).json()["version"] == body["version"]
    prompt = {"prompt": "The weather today is", "max_tokens": 8, "ignore_eos": True}
    with_adapter = (await client.post("/generate", json={**prompt, "adapter_id": "api-lora"})).json()
    base = (await client.post("/generate", json=prompt)).json()
    assert with_adapter["token_ids"] != base["token_ids"]
    assert (await client.delete("/adapters/api-lora")).status_code == 204
    r = await client.post("/generate", json={**prompt, "adapter_id": "api-lora"})
    assert r.status_code == 404 and "unknown adapter" in r.json()["error"]["message"]
    assert (await client.get("/adapters/api-lora")).status_code == 404
    assert (await client.delete("/adapters/api-lora")).status_code == 404


async def test_reupload_publishes_new_version(client):
    first = (await client.post("/adapters", data=files(adapter_id="swap")[0], files=files(adapter_id="swap")[1])).json()
    data, upload = files(tensors=lora_tensors(seed=9), adapter_id="swap")
    second = (await client.post("/adapters", data=data, files=upload)).json()
    assert first["version"] != second["version"]
    assert (await client.get("/adapters/swap")).json()["version"] == second["version"]


def _nan_tensors():
    t = lora_tensors()
    next(iter(t.values()))[0, 0] = float("nan")
    return t


def _drop_b():
    t = lora_tensors()
    del t[f"{P}0.self_attn.q_proj.lora_B.weight"]
    return t


def _wrong_shape():
    t = lora_tensors()
    t[f"{P}0.self_attn.v_proj.lora_B.weight"] = torch.zeros(576, 4)
    return t


def _unknown_layer():
    t = lora_tensors()
    t[f"{P}99.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 576)
    t[f"{P}99.self_attn.q_proj.lora_B.weight"] = torch.zeros(576, 4)
    return t


BAD_UPLOADS = {
    "bad id": (files(adapter_id="../escape"), 400, "adapter"),
    "id with space": (files(adapter_id="a b"), 400, "adapter"),
    "config not json": (files(config=b"{nope"), 400, "JSON"),
    "weights not safetensors": (files(tensors=b"\x00" * 64), 400, "safetensors"),
    "pickled weights": (files(tensors=pickle.dumps({"a": 1})), 400, "safetensors"),
    "unsupported peft_type": (files(config=lora_config(peft_type="IA3")), 422, "IA3"),
    "bias all": (files(config=lora_config(bias="all")), 422, "bias"),
    "modules_to_save": (files(config=lora_config(modules_to_save=["lm_head"])), 422, "modules_to_save"),
    "pissa init": (files(config=lora_config(init_lora_weights="pissa")), 422, "pissa"),
    "rank mismatch": (files(config=lora_config(r=8)), 422, "rank"),
    "rank above max": (files(config=lora_config(r=128), tensors=lora_tensors(rank=128, layers=range(1))), 422, "rank"),
    "nan": (files(tensors=_nan_tensors()), 422, "NaN"),
    "missing B": (files(tensors=_drop_b()), 422, "lora_B"),
    "shape mismatch": (files(tensors=_wrong_shape()), 422, "shape"),
    "unknown layer": (files(tensors=_unknown_layer()), 422, "layers.99"),
    "int tensors": (files(tensors={k: v.to(torch.int32) for k, v in lora_tensors().items()}), 422, "dtype"),
    "too large": (files(tensors=lora_tensors(rank=64, layers=range(30))), 413, "limit"),
    "missing peft_type": (files(config={"r": 4}), 422, "peft_type"),
    # Found by an outside tester (issue 10): accepted before, none can be what the user meant.
    "reserved id": (files(adapter_id="CURRENT"), 400, "reserved"),
    "reserved id any case": (files(adapter_id="current"), 400, "reserved"),
    "target embed_tokens": (files(config=lora_config(target_modules=["embed_tokens"])), 422, "embed_tokens"),
    "target lm_head without tensors": (
        files(config=lora_config(target_modules=["lm_head", "q_proj", "v_proj"])),
        422,
        "lm_head",
    ),
    "targets miss file layers": (files(config=lora_config(target_modules=["q_proj"])), 422, "v_proj"),
    "layer 999": (files(config=lora_config(layers_to_transform=[999])), 422, "999"),
    "alpha 1e308": (files(config=lora_config(lora_alpha=1e308)), 422, "alpha"),
    "alpha 1e30": (files(config=lora_config(lora_alpha=1e30)), 422, "alpha"),
    "alpha 0": (files(config=lora_config(lora_alpha=0)), 422, "alpha"),
    "alpha negative": (files(config=lora_config(lora_alpha=-8)), 422, "alpha"),
    "alpha_pattern 1e30": (files(config=lora_config(alpha_pattern={"q_proj": 1e30})), 422, "alpha"),
    "config nested 100k deep": (files(config=b"[" * 100_000 + b"]" * 100_000), 400, "JSON"),
    "config a list": (files(config=b"[1, 2]"), 400, "object"),
    "weights header length huge": (files(tensors=(2**62).to_bytes(8, "little") + b"{}"), 400, "safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
async def test_bad_upload_is_rejected_and_store_unchanged(client, adapters_dir, case):
    (data, upload), status, needle = BAD_UPLOADS[case]
    before = snapshot(adapters_dir)
    r = await client.post("/adapters", data=data, files=upload)
    assert r.status_code == status, r.text
    assert needle.lower() in r.json()["error"]["message"].lower()
    assert snapshot(adapters_dir) == before


async def test_cross_site_upload_is_refused(client, adapters_dir):
    """A web page can post a multipart form to localhost without a CORS preflight: the Origin header
    it cannot avoid sending is what refuses it. Clients that are not browsers send no Origin."""
    before = snapshot(adapters_dir)
    data, upload = files(adapter_id="from-evil")
    r = await client.post("/adapters", data=data, files=upload, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
    r = await client.delete("/adapters/good", headers={"origin": "null"})
    assert r.status_code == 403
    assert snapshot(adapters_dir) == before
    preflight = await client.options(
        "/generate", headers={"origin": "http://evil.example", "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize(
    "request_kwargs,needle",
    [
        ({"data": {"adapter_id": "x"}}, "multipart"),
        ({"data": {"adapter_id": "x"}, "files": {"config": ("c.json", b"{}")}}, "weights"),
        ({"files": files()[1]}, "adapter_id"),
        ({"content": b"--zz\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, ""),
    ],
)
async def test_malformed_multipart_is_400(client, adapters_dir, request_kwargs, needle):
    before = snapshot(adapters_dir)
    r = await client.post("/adapters", **request_kwargs)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert snapshot(adapters_dir) == before
