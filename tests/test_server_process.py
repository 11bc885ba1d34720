"""The server as a real uvicorn process on 127.0.0.1: generate, stream, and client disconnects."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.live_server import live_server, wait_until


@pytest.fixture(scope="module")
def server_url(demo_model_dir, tmp_path_factory):
    with live_server(
        demo_model_dir,
        tmp_path_factory.mktemp("adapters"),
        "--max-model-len",
        "512",
        "--kv-cache-gb",
        "0.5",
        "--max-num-seqs",
        "4",
    ) as url:
        yield url


def _aborted(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('requests_total{outcome="abort"}'):
            return float(line.split()[-1])
    return 0.0


def test_real_server_generates(server_url):
    r = httpx.post(
        f"{server_url}/generate",
        json={"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 20},
        timeout=120,
    )
    assert r.status_code == 200
    assert "Paris" in r.json()["text"]


def test_stream_disconnect_frees_kv(server_url):
    aborted = _aborted(server_url)
    with httpx.Client(timeout=120) as client:
        with client.stream(
            "POST",
            f"{server_url}/generate",
            json={"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True},
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first.removeprefix("data: "))["token_ids"]
            assert httpx.get(f"{server_url}/health").json()["kv_blocks_used"] > 0
        # leaving the block closes the connection mid-stream
    wait_until(
        lambda: httpx.get(f"{server_url}/health").json()["kv_blocks_used"] == 0,
        30,
        "the aborted stream's KV slot to be freed",
    )
    assert _aborted(server_url) == aborted + 1


def test_non_stream_disconnect_frees_kv(server_url):
    aborted = _aborted(server_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server_url}/generate", json={"prompt": "Go on:", "max_tokens": 400, "ignore_eos": True}, timeout=1.5
        )
    wait_until(
        lambda: httpx.get(f"{server_url}/health").json()["kv_blocks_used"] == 0,
        30,
        "the abandoned request's KV slot to be freed",
    )
    assert _aborted(server_url) == aborted + 1  # freed by the abort, not by finishing 400 tokens
