"""The conversion routes over HTTP with tenants: convert, merge and full fine-tune publish a servable LoRA
with its report, the report survives a restart, and bad requests get a 4xx."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save

from server.app import create_app
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.runtime import build_runtime
from server.tenancy.keys import add_key

pytestmark = pytest.mark.anyio
P = "base_model.model.model.layers."
CAP = 16  # --max-lora-rank of these servers


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    made = {t: add_key(path, t, "user") for t in ("acme", "globex")}
    made["root"] = add_key(path, "ops", "admin")
    return path, made


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conversion-api")


def make_app(model_dir: Path, adapters_dir: Path, keys_file: Path):
    runtime = build_runtime(
        ServerConfig(
            model=model_dir,
            dtype="float32",
            adapters_dir=adapters_dir,
            api_keys=keys_file,
            engine=EngineConfig(max_model_len=128, max_num_seqs=2, kv_cache_gb=0.05),
            adapters=AdapterConfig(max_rank=CAP, max_full_finetune_mb=1),
        )
    )
    return create_app(runtime)


@pytest.fixture(scope="module")
def app(tiny_served_model_dir, adapters_dir, keys):
    return make_app(tiny_served_model_dir, adapters_dir, keys[0])


async def open_client(app):
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120)


@pytest.fixture
async def client(app):
    async with app.router.lifespan_context(app):
        async with await open_client(app) as c:
            yield c


def auth(keys, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[1][tenant]}"}


def lora(seed: int, rank: int = 4) -> tuple[bytes, bytes]:
    """A LoRA on q_proj and v_proj of the tiny served model (hidden 64, KV width 32, two layers)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for proj, out_f in (("q_proj", 64), ("v_proj", 32)):
            tensors[f"{P}{layer}.self_attn.{proj}.lora_A.weight"] = torch.randn(rank, 64, generator=g) * 0.3
            tensors[f"{P}{layer}.self_attn.{proj}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    return json.dumps(config).encode(), save(tensors)


async def upload(client, headers, adapter_id: str, seed: int) -> dict:
    config, weights = lora(seed)
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    r = await client.post("/adapters", data={"adapter_id": adapter_id}, files=files, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


async def test_convert_publishes_a_servable_lora_with_its_report(client, keys, adapters_dir):
    acme = auth(keys, "acme")
    await upload(client, acme, "src", seed=1)
    r = await client.post("/adapters/src/convert", json={"target_id": "small", "rank": 2}, headers=acme)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["adapter_id"] == "small" and body["kind"] == "lora" and body["rank"] == 2 and body["owner"] == "acme"
    report = body["conversion"]
    assert report["source"]["adapter"] == "acme/src" and report["target"] == {"rank": 2}
    assert len(report["layers"]) == 4 and all(layer["rank"] == 2 for layer in report["layers"])
    assert 0 < report["totals"]["frobenius_error_rel"] < 1 and report["logits"]["max_logit_diff"] > 0
    assert body["conversion_seconds"] > 0
    got = await client.get("/adapters/small", headers=acme)
    assert got.status_code == 200 and got.json()["conversion"] == report
    assert (await client.get("/adapters/src", headers=acme)).json()["conversion"] is None
    gen = await client.post(
        "/generate", json={"prompt": "Hello", "adapter_id": "small", "max_tokens": 3, "ignore_eos": True}, headers=acme
    )
    assert gen.status_code == 200, gen.text
    # An error target allocates ranks across layers; the result meets it.
    r = await client.post("/adapters/src/convert", json={"target_id": "tight", "max_relative_error": 0.2}, headers=acme)
    assert r.status_code == 201, r.text
    assert r.json()["conversion"]["totals"]["frobenius_error_rel"] <= 0.2
    assert not list(adapters_dir.glob(".tmp-*"))


async def test_the_report_survives_a_restart(client, keys, tiny_served_model_dir, adapters_dir):
    acme = auth(keys, "acme")
    before = (await client.get("/adapters/small", headers=acme)).json()
    restarted = make_app(tiny_served_model_dir, adapters_dir, keys[0])
    async with restarted.router.lifespan_context(restarted), await open_client(restarted) as other:
        after = await other.get("/adapters/small", headers=acme)
    assert after.status_code == 200
    assert after.json()["conversion"] == before["conversion"] and after.json()["version"] == before["version"]


@pytest.mark.parametrize(
    "name, body, status",
    [
        ("nothing", {"target_id": "x", "rank": 2}, 404),
        ("src", {"target_id": "x", "rank": 0}, 422),
        ("src", {"target_id": "x", "rank": CAP + 1}, 422),
        ("src", {"target_id": "x", "rank": 2, "energy": 0.9}, 422),
        ("src", {"target_id": "x"}, 422),
        ("src", {"target_id": "x", "energy": 1.5}, 422),
        ("src", {"target_id": "x", "rank": "2"}, 422),
        ("src", {"target_id": "x", "rank": 2, "extra": 1}, 422),
        ("src", {"target_id": "../x", "rank": 2}, 400),
    ],
)
async def test_bad_convert_requests_get_4xx(client, keys, name, body, status):
    r = await client.post(f"/adapters/{name}/convert", json=body, headers=auth(keys, "acme"))
    assert r.status_code == status, r.text
    assert (await client.get("/adapters/x", headers=auth(keys, "acme"))).status_code == 404


async def test_another_tenants_adapter_is_404_unless_public_and_never_merged(client, keys):
    globex = auth(keys, "globex")
    r = await client.post("/adapters/acme/src/convert", json={"target_id": "mine", "rank": 1}, headers=globex)
    assert r.status_code == 404, r.text
    admin = auth(keys, "root")
    assert (await client.patch("/adapters/acme/src", json={"public": True}, headers=admin)).status_code == 200
    r = await client.post("/adapters/acme/src/convert", json={"target_id": "mine", "rank": 1}, headers=globex)
    assert r.status_code == 201, r.text
    assert r.json()["owner"] == "globex"
    merge = {"target_id": "m", "rank": 2, "sources": [{"adapter_id": "acme/src", "weight": 1.0}]}
    assert (await client.post("/adapters/merge", json=merge, headers=globex)).status_code == 404


async def test_merge_route(client, keys):
    acme = auth(keys, "acme")
    await upload(client, acme, "src2", seed=2)
    sources = [{"adapter_id": "src", "weight": 0.5}, {"adapter_id": "src2", "weight": 0.5}]
    r = await client.post(
        "/adapters/merge",
        json={"target_id": "both", "energy": 0.9, "sources": sources, "combination": "ties", "density": 0.7},
        headers=acme,
    )
    assert r.status_code == 201, r.text
    source = r.json()["conversion"]["source"]
    assert source["kind"] == "merge" and source["method"] == "ties" and len(source["sources"]) == 2
    assert r.json()["conversion"]["totals"]["energy_kept"] >= 0.9
    for bad in (
        {"combination": "ties"},  # no density
        {"combination": "linear", "density": 0.5},
        {"combination": "svd"},
        {"sources": []},
        {"sources": [{"adapter_id": "nothing", "weight": 1.0}]},
    ):
        body = {"target_id": "bad", "rank": 2, "sources": sources, **bad}
        r = await client.post("/adapters/merge", json=body, headers=acme)
        assert r.status_code in (404, 422), r.text
        assert r.status_code == (404 if bad.get("sources") and bad["sources"][0]["adapter_id"] == "nothing" else 422)


async def test_full_finetune_upload(client, keys, tiny_served_model_dir, adapters_dir):
    acme = auth(keys, "acme")
    state = load_file(tiny_served_model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    changed = {}
    for layer in range(2):
        key = f"model.layers.{layer}.self_attn.o_proj.weight"
        changed[key] = state[key] + 0.05 * torch.randn(64, 3, generator=g) @ torch.randn(3, 64, generator=g)
    changed["model.norm.weight"] = state["model.norm.weight"] + 1  # not adaptable: ignored
    url = "/adapters/full-finetune?target_id=ft&rank=3"
    r = await client.post(url, content=save(changed), headers=acme)
    assert r.status_code == 201, r.text
    report = r.json()["conversion"]
    assert report["source"]["kind"] == "full" and report["source"]["ignored_examples"] == ["model.norm.weight"]
    assert [layer["rank"] for layer in report["layers"]] == [3, 3]
    assert report["totals"]["frobenius_error_rel"] < 1e-5  # a rank-3 change kept at rank 3
    for url, content, status in (
        ("/adapters/full-finetune?target_id=ft2&rank=3", b"not safetensors at all", 400),
        ("/adapters/full-finetune?target_id=ft2&rank=3", save({"lm_head.weight": torch.zeros(2, 2)}), 422),
        ("/adapters/full-finetune?target_id=ft2&rank=0", save(changed), 422),
        ("/adapters/full-finetune?rank=3", save(changed), 422),
        ("/adapters/full-finetune?target_id=ft2&rank=3", b"\0" * (2 * 2**20), 413),
    ):
        r = await client.post(url, content=content, headers=acme)
        assert r.status_code == status, (url, r.text)
    assert not list(adapters_dir.glob(".tmp-*"))  # the spooled files are gone
