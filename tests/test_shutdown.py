"""SIGTERM: the server stops accepting, lets a running stream finish, exits cleanly, and every
published adapter is there after a restart."""

from __future__ import annotations

import json
import signal
import time

import httpx

from tests.live_server import start_server
from tests.test_tenancy import _lora


def test_sigterm_lets_running_streams_finish_and_keeps_adapters(tiny_served_model_dir, tmp_path):
    proc, url = start_server(tiny_served_model_dir, tmp_path, "--shutdown-timeout-s", "60")
    try:
        config, weights = _lora(seed=1)
        files = {"config": ("c.json", config), "weights": ("w.safetensors", weights)}
        assert httpx.post(f"{url}/adapters", data={"adapter_id": "kept"}, files=files, timeout=60).status_code == 201
        body = {"prompt": "Tell me a story", "max_tokens": 400, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    break
            proc.send_signal(signal.SIGTERM)  # mid-stream
            time.sleep(0.3)
            try:
                refused = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 1}, timeout=5)
            except httpx.TransportError:
                refused = None  # the listening socket is closed: nothing new is accepted
            events += [line for line in lines if line.startswith("data: ")]
        assert refused is None or refused.status_code >= 500
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 400
        # A clean exit; uvicorn re-raises the SIGTERM it handled once shutdown is done.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, url = start_server(tiny_served_model_dir, tmp_path)
    try:
        assert httpx.get(f"{url}/adapters/kept", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
