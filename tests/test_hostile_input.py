"""Hostile and malformed /generate requests: each gets a 4xx naming the problem, nothing reaches the
engine, and the server keeps serving everyone else. (Bad uploads: tests/test_adapters_api.py.)"""

from __future__ import annotations

import json

import httpx
import pytest

from server.app import create_app
from server.config import EngineConfig, ServerConfig
from server.runtime import build_runtime

pytestmark = pytest.mark.anyio

REQUEST_CAP_MB = 1


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def app(tiny_served_model_dir, tmp_path_factory):
    runtime = build_runtime(
        ServerConfig(
            model=tiny_served_model_dir,
            dtype="float32",
            max_request_mb=REQUEST_CAP_MB,
            adapters_dir=tmp_path_factory.mktemp("adapters"),
            engine=EngineConfig(max_model_len=128, max_num_seqs=4, kv_cache_gb=0.1),
        )
    )
    return create_app(runtime)


@pytest.fixture
async def client(app):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            yield c


def _metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


USER = {"role": "user", "content": "hi"}
SURROGATE = "\ud800x"  # valid JSON ("\\ud800x"), not valid Unicode text

BAD_GENERATE = {
    # undecodable text: 400
    "surrogate in prompt": ({"prompt": SURROGATE}, 400, "Unicode"),
    "surrogate in content": ({"messages": [{"role": "user", "content": SURROGATE}]}, 400, "Unicode"),
    "surrogate in role": ({"messages": [{"role": SURROGATE, "content": "hi"}]}, 400, "Unicode"),
    "surrogate in stop": ({"prompt": "hi", "stop": [SURROGATE]}, 400, "Unicode"),
    "surrogate in adapter_id": ({"prompt": "hi", "adapter_id": SURROGATE}, 400, "Unicode"),
    "surrogate streaming": ({"prompt": SURROGATE, "stream": True}, 400, "Unicode"),
    # types: strict, a string is never a number
    "temperature string": ({"prompt": "hi", "temperature": "0.5"}, 422, "temperature"),
    "top_p string": ({"prompt": "hi", "top_p": "1"}, 422, "top_p"),
    "max_tokens float": ({"prompt": "hi", "max_tokens": 4.5}, 422, "max_tokens"),
    "seed string": ({"prompt": "hi", "seed": "7"}, 422, "seed"),
    "stream int": ({"prompt": "hi", "stream": 1}, 422, "stream"),
    "prompt list": ({"prompt": ["hi"]}, 422, "prompt"),
    "messages object": ({"messages": {"role": "user", "content": "hi"}}, 422, "messages"),
    "content null": ({"messages": [{"role": "user", "content": None}]}, 422, "content"),
    "body a list": ([{"prompt": "hi"}], 422, "dictionary"),
    # ranges
    "role wizard": ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    "role empty": ({"messages": [{"role": "", "content": "hi"}]}, 422, "role"),
    "top_k 2^64": ({"prompt": "hi", "top_k": 2**64}, 422, "top_k"),
    "max_tokens 2^40": ({"prompt": "hi", "max_tokens": 2**40}, 422, "max_tokens"),
    "seed negative": ({"prompt": "hi", "seed": -1}, 422, "seed"),
    "seed 2^64": ({"prompt": "hi", "seed": 2**64}, 422, "seed"),
    "temperature 1e9": ({"prompt": "hi", "temperature": 1e9}, 422, "temperature"),
    "top_p above 1": ({"prompt": "hi", "top_p": 1.5}, 422, "top_p"),
    "mode unknown": ({"prompt": "hi", "mode": "fast"}, 422, "mode"),
    "empty stop": ({"prompt": "hi", "stop": [""]}, 422, "stop"),
    "too many stops": ({"prompt": "hi", "stop": ["x"] * 17}, 422, "stop"),
    "stop too long": ({"prompt": "hi", "stop": "x" * 257}, 422, "stop"),
    "too many messages": ({"messages": [USER] * 1025}, 422, "messages"),
    "adapter_id too long": ({"prompt": "hi", "adapter_id": "a" * 300}, 422, "adapter_id"),
    "unknown field": ({"prompt": "hi", "logit_bias": {"1": 5}}, 422, "logit_bias"),
    # sizes and context
    "prompt cannot fit": ({"prompt": "x" * 200_000}, 400, "cannot fit"),
    "prompt over context": ({"prompt": "word " * 200}, 400, "context"),
    "max_tokens over context": ({"prompt": "hi", "max_tokens": 500}, 400, "context"),
    "unknown adapter": ({"prompt": "hi", "adapter_id": "nobody"}, 404, "unknown adapter"),
}


@pytest.mark.parametrize("case", sorted(BAD_GENERATE))
async def test_bad_generate_is_4xx_naming_the_problem(client, case):
    payload, status, needle = BAD_GENERATE[case]
    before = await client.get("/metrics")
    r = await client.post("/generate", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle.lower() in r.json()["error"]["message"].lower()
    after = (await client.get("/metrics")).text
    assert (
        _metric(after, 'requests_total{outcome="rejected"}')
        == _metric(before.text, 'requests_total{outcome="rejected"}') + 1
    )
    assert (await client.get("/health")).json()["running"] == 0


@pytest.mark.parametrize(
    "body,status",
    [
        (b"{not json", 400),
        (b'{"prompt": "\xff\xfe"}', 400),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, 400),  # nested past the JSON parser's recursion
        (b'{"prompt": "hi", "prompt": 5}', 422),  # duplicate key: the last one wins, and is wrong
        (b"", 422),
    ],
)
async def test_undecodable_bodies_are_4xx(client, body, status):
    r = await client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


async def test_body_over_the_cap_is_413_before_parsing(client):
    big = json.dumps({"prompt": "x" * (REQUEST_CAP_MB * 2**20 + 10)}).encode()
    r = await client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(REQUEST_CAP_MB * 4):
            yield b" " * 2**18
        yield b'{"prompt": "hi"}'

    r = await client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


async def test_cross_site_generate_is_refused_and_allowed_origins_pass(app, client):
    r = await client.post(
        "/generate", json={"prompt": "hi", "max_tokens": 1}, headers={"origin": "http://evil.example"}
    )
    assert r.status_code == 403
    assert (await client.get("/health", headers={"origin": "http://evil.example"})).status_code == 200


async def test_health_names_the_model_without_its_path(client, tiny_served_model_dir):
    health = (await client.get("/health")).json()
    assert health["model"] == tiny_served_model_dir.name
    assert str(tiny_served_model_dir.parent) not in json.dumps(health)


async def test_server_still_serves_after_the_table(client):
    r = await client.post("/generate", json={"prompt": "hello there", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and len(r.json()["token_ids"]) == 4


def test_openapi_lists_every_status_the_routes_return(app):
    paths = app.openapi()["paths"]
    assert set(paths["/generate"]["post"]["responses"]) >= {
        "200",
        "400",
        "401",
        "403",
        "404",
        "413",
        "422",
        "429",
        "500",
    }
    assert set(paths["/adapters"]["post"]["responses"]) >= {"201", "400", "401", "403", "413", "422", "429", "500"}
    assert set(paths["/adapters/{name}"]["delete"]["responses"]) >= {"204", "401", "403", "404"}
    assert set(paths["/adapters/{name}"]["get"]["responses"]) >= {"200", "401", "404"}
    assert set(paths["/adapters/{name}"]["patch"]["responses"]) >= {"200", "401", "403", "404"}
