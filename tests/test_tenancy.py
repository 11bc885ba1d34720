"""Keys, tenants and quotas on a real server process: who may see, use and change which adapter,
what survives a restart, and the limits answered with 429 + Retry-After."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import pytest
import torch
from safetensors.torch import save

from server.tenancy.keys import KeyRing, add_key, key_digest
from tests.live_server import live_server, wait_until

P = "base_model.model.model.layers."


def _lora(seed: int, scale: float = 0.5) -> tuple[bytes, bytes]:
    """A rank-2 LoRA on q_proj of the tiny served model (hidden 64, two layers)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        tensors[f"{P}{layer}.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 64, generator=gen) * scale
        tensors[f"{P}{layer}.self_attn.q_proj.lora_B.weight"] = torch.randn(64, 2, generator=gen) * scale
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    return json.dumps(config).encode(), save(tensors)


def _upload(url: str, key: str, adapter_id: str, seed: int) -> httpx.Response:
    config, weights = _lora(seed)
    return httpx.post(
        f"{url}/adapters",
        headers={"Authorization": f"Bearer {key}"},
        data={"adapter_id": adapter_id},
        files={"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)},
        timeout=60,
    )


def _generate(url: str, key: str, adapter: str | None, max_tokens: int = 4) -> httpx.Response:
    body = {"prompt": "Hello there", "max_tokens": max_tokens, "ignore_eos": True}
    if adapter is not None:
        body["adapter_id"] = adapter
    return httpx.post(f"{url}/generate", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60)


def _names(url: str, key: str) -> list[str]:
    r = httpx.get(f"{url}/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200, r.text
    return sorted(a["name"] for a in r.json()["adapters"])


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    made = {t: add_key(path, t, "user") for t in ("acme", "globex", "tiny")}
    made["root"] = add_key(path, "ops", "admin")
    return path, made


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tenant-adapters")


@pytest.fixture(scope="module")
def limits_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "limits.json"
    path.write_text(json.dumps({"tiny": {"max_adapters": 1, "max_running": 1, "max_queued": 1}}))
    return path


@pytest.fixture(scope="module")
def server(tiny_served_model_dir, store_dir, keys, limits_file):
    with live_server(
        tiny_served_model_dir, store_dir, "--api-keys", str(keys[0]), "--tenant-limits", str(limits_file)
    ) as url:
        yield url


def test_keys_file_holds_digests_only_and_the_cli_prints_the_key_once(tmp_path):
    path = tmp_path / "k.json"
    out = subprocess.run(
        [sys.executable, "-m", "server", "keys", "add", "--file", str(path), "--tenant", "acme", "--role", "admin"],
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip()
    assert key.startswith("sk-") and key not in path.read_text()
    assert json.loads(path.read_text()) == {key_digest(key): {"tenant": "acme", "role": "admin"}}
    ring = KeyRing.load(path)
    assert ring.authenticate(key).tenant == "acme" and ring.authenticate(key + "x") is None


def test_requests_without_a_valid_key_get_401(server):
    for headers in ({}, {"Authorization": "Bearer sk-nope"}, {"Authorization": "Basic abc"}):
        r = httpx.post(f"{server}/generate", json={"prompt": "hi", "max_tokens": 1}, headers=headers, timeout=10)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer" and "key" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/adapters", timeout=10).status_code == 401
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200  # liveness stays open


def test_tenants_own_their_adapters_and_cannot_see_each_other(server, keys):
    _, k = keys
    assert _upload(server, k["acme"], "my-lora", seed=1).status_code == 201
    assert _upload(server, k["globex"], "my-lora", seed=2).status_code == 201  # same id, another tenant
    assert _names(server, k["acme"]) == ["my-lora"] and _names(server, k["globex"]) == ["my-lora"]
    mine = httpx.get(f"{server}/adapters/my-lora", headers={"Authorization": f"Bearer {k['acme']}"}, timeout=10)
    theirs = httpx.get(f"{server}/adapters/my-lora", headers={"Authorization": f"Bearer {k['globex']}"}, timeout=10)
    assert mine.json()["owner"] == "acme" and theirs.json()["owner"] == "globex"
    assert mine.json()["version"] != theirs.json()["version"]
    # Another tenant's private adapter is answered exactly like one that does not exist.
    as_globex = {"Authorization": f"Bearer {k['globex']}"}
    for name in ("acme/my-lora", "acme/nothing"):
        assert httpx.get(f"{server}/adapters/{name}", headers=as_globex, timeout=10).status_code == 404
        assert httpx.delete(f"{server}/adapters/{name}", headers=as_globex, timeout=10).status_code == 404
        assert _generate(server, k["globex"], name).status_code == 404
    assert _generate(server, k["acme"], "my-lora").status_code == 200
    # Each tenant's my-lora is its own: their outputs differ (large random deltas).
    assert _generate(server, k["acme"], "my-lora", 8).json() != _generate(server, k["globex"], "my-lora", 8).json()


def test_admin_sees_all_and_makes_an_adapter_public(server, keys):
    _, k = keys
    _upload(server, k["acme"], "shared", seed=3)
    as_admin, as_globex = {"Authorization": f"Bearer {k['root']}"}, {"Authorization": f"Bearer {k['globex']}"}
    assert {"acme/shared", "acme/my-lora", "globex/my-lora"} <= set(_names(server, k["root"]))
    url = f"{server}/adapters/acme/shared"
    assert httpx.patch(url, json={"public": True}, headers=as_globex, timeout=10).status_code == 404
    own = httpx.patch(f"{server}/adapters/my-lora", json={"public": True}, headers=as_globex, timeout=10)
    assert own.status_code == 403  # only an admin publishes, even one's own
    made = httpx.patch(url, json={"public": True}, headers=as_admin, timeout=10)
    assert made.status_code == 200 and made.json()["public"] is True
    assert "acme/shared" in _names(server, k["globex"])
    assert _generate(server, k["globex"], "acme/shared").status_code == 200
    assert httpx.delete(url, headers=as_globex, timeout=10).status_code == 403  # usable, not writable
    denied = _upload(server, k["globex"], "acme/shared", seed=4)
    assert denied.status_code == 400  # uploads name the caller's own ids only


def test_ownership_and_public_marks_survive_a_restart(tiny_served_model_dir, store_dir, keys, server):
    path, k = keys
    with live_server(tiny_served_model_dir, store_dir, "--api-keys", str(path)) as url:
        assert _names(url, k["acme"]) == ["my-lora", "shared"]
        assert _names(url, k["globex"]) == ["acme/shared", "my-lora"]
        assert (store_dir / "acme" / "my-lora").is_dir() and (store_dir / "globex" / "my-lora").is_dir()


def test_storage_quota_answers_429_with_retry_after(server, keys):
    _, k = keys
    assert _upload(server, k["tiny"], "one", seed=5).status_code == 201
    assert _upload(server, k["tiny"], "one", seed=6).status_code == 201  # replacing is not adding
    r = _upload(server, k["tiny"], "two", seed=7)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "max_adapters" in r.json()["error"]["message"]
    assert [n for n in _names(server, k["tiny"]) if "/" not in n] == ["one"]  # own adapters


def test_requests_in_flight_over_the_tenant_limit_get_429(server, keys):
    _, k = keys
    results: list[int] = []

    def long_request() -> None:  # ~500 engine steps: long enough to probe while it runs
        results.append(_generate(server, k["tiny"], None, max_tokens=480).status_code)

    threads = [threading.Thread(target=long_request) for _ in range(2)]  # 1 running + 1 queued
    for t in threads:
        t.start()
    wait_until(lambda: _health(server)["running"] + _health(server)["waiting"] == 2, 30, "both to be in flight")
    r = _generate(server, k["tiny"], None, max_tokens=1)
    others = _generate(server, k["acme"], None, max_tokens=1)  # tiny's limits are tiny's only
    for t in threads:
        t.join()
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert "max_queued" in r.json()["error"]["message"]
    assert results == [200, 200] and others.status_code == 200


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def test_metrics_need_an_admin_key_and_label_tenants(server, keys):
    _, k = keys
    assert httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {k['acme']}"}).status_code == 403
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {k['root']}"}).text
    assert 'tenant_requests_total{outcome="length",tenant="acme"}' in text
    assert 'adapter_requests_total{adapter="acme/my-lora",outcome="length"}' in text
