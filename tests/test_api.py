"""HTTP API in-process (httpx ASGI client) on the real SmolLM2 model."""

from __future__ import annotations

import json

import httpx
import pytest

from server.app import create_app
from server.config import EngineConfig, ServerConfig
from server.runtime import build_runtime


@pytest.fixture(scope="module")
def app(demo_model_dir, tmp_path_factory):
    runtime = build_runtime(
        ServerConfig(
            model=demo_model_dir,
            dtype="float32",
            adapters_dir=tmp_path_factory.mktemp("adapters"),
            engine=EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_gb=0.5),
        )
    )
    return create_app(runtime)


@pytest.fixture
async def client(app):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            yield c


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_generate_chat_answers_paris(client):
    r = await client.post(
        "/generate",
        json={"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 20},
    )
    assert r.status_code == 200
    body = r.json()
    assert "Paris" in body["text"]
    assert body["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(body["token_ids"])
    assert body["usage"]["prompt_tokens"] > 10
    assert body["id"].startswith("gen-")


async def test_stream_sends_deltas_then_final_then_done(client):
    payload = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True, "stream": True}
    r = await client.post("/generate", json=payload)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 8
    assert sum(len(e["token_ids"]) for e in events) == 8
    whole = (await client.post("/generate", json={**payload, "stream": False})).json()
    assert "".join(e["text"] for e in events) == whole["text"]
    assert [t for e in events for t in e["token_ids"]] == whole["token_ids"]


async def test_stop_string_via_api(client):
    r = await client.post(
        "/generate",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20,
            "stop": ["Paris"],
        },
    )
    body = r.json()
    assert body["finish_reason"] == "stop" and "Paris" not in body["text"]


BAD_REQUESTS = [
    ({}, 422, "prompt"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 422, "not both"),
    ({"prompt": ""}, 422, "empty"),
    ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 1000}, 400, "exceeds the context"),
    ({"prompt": "word " * 400}, 400, "context"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "hi", "max_tokens": "ten"}, 422, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
    ({"prompt": "hi", "stream": "yes"}, 422, "stream"),
    ({"messages": [{"role": "user"}]}, 422, "content"),
    ({"messages": []}, 422, "messages"),
    ({"prompt": "hi", "stop": [""]}, 422, "stop"),
    ({"prompt": "hi", "adapter_id": "nobody"}, 404, "unknown adapter"),
    ({"prompt": "hi", "unexpected": 1}, 422, "unexpected"),
]


@pytest.mark.parametrize("payload,status,needle", BAD_REQUESTS)
async def test_bad_input_gets_4xx_naming_the_problem(client, payload, status, needle):
    r = await client.post("/generate", json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    assert error["type"]


async def test_malformed_json_is_400(client):
    r = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "error" in r.json()


async def test_health_and_metrics(client):
    await client.post("/generate", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    health = (await client.get("/health")).json()
    assert health["status"] == "ok" and health["dtype"] == "float32" and health["device"] == "cpu"
    assert health["kernel_backend"] == "torch"  # no CUDA here: chosen once at startup
    text = (await client.get("/metrics")).text
    for name in (
        "requests_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "queue_depth",
        "running_sequences",
        "kv_cache_usage_ratio",
    ):
        assert name in text
    assert 'requests_total{outcome="length"}' in text
