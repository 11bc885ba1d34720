"""The server as a real uvicorn process on 127.0.0.1: generate, stream, and client disconnects."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server_url(demo_model_dir, tmp_path_factory):
    port = _free_port()
    cmd = [sys.executable, "-m", "server", "--model", str(demo_model_dir), "--dtype", "float32", "--port", str(port),
           "--max-model-len", "512", "--kv-cache-gb", "0.5", "--max-num-seqs", "4",
           "--adapters-dir", str(tmp_path_factory.mktemp("adapters")), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_until(healthy, 120, "the server to start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _aborted(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('requests_total{outcome="abort"}'):
            return float(line.split()[-1])
    return 0.0


def test_real_server_generates(server_url):
    r = httpx.post(f"{server_url}/generate", json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                                   "max_tokens": 20}, timeout=120)
    assert r.status_code == 200
    assert "Paris" in r.json()["text"]


def test_stream_disconnect_frees_kv(server_url):
    aborted = _aborted(server_url)
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{server_url}/generate",
                           json={"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first.removeprefix("data: "))["token_ids"]
            assert httpx.get(f"{server_url}/health").json()["kv_slots_used"] == 1
        # leaving the block closes the connection mid-stream
    _wait_until(lambda: httpx.get(f"{server_url}/health").json()["kv_slots_used"] == 0, 30,
                "the aborted stream's KV slot to be freed")
    assert _aborted(server_url) == aborted + 1


def test_non_stream_disconnect_frees_kv(server_url):
    aborted = _aborted(server_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server_url}/generate", json={"prompt": "Go on:", "max_tokens": 400, "ignore_eos": True},
                   timeout=1.5)
    _wait_until(lambda: httpx.get(f"{server_url}/health").json()["kv_slots_used"] == 0, 30,
                "the abandoned request's KV slot to be freed")
    assert _aborted(server_url) == aborted + 1  # freed by the abort, not by finishing 400 tokens
