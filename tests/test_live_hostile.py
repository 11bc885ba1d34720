"""Hostile clients against a real uvicorn process: a giant prompt never freezes the event loop, and a
bounded property-based run over the OpenAPI schema (schemathesis) never gets a 5xx."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.live_server import live_server

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def tiny_url(tiny_served_model_dir, tmp_path_factory):
    with live_server(
        tiny_served_model_dir,
        tmp_path_factory.mktemp("adapters"),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-gb",
        "0.1",
        "--max-num-seqs",
        "4",
        "--max-upload-mb",
        "1",
    ) as url:
        yield url


def _slowest_health(url: str, work) -> tuple[float, list]:
    """Run `work()` in a thread while polling /health; return the slowest /health and work's result."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(work()))
    slowest = 0.0
    with httpx.Client(timeout=60) as client:
        thread.start()
        while thread.is_alive():
            started = time.perf_counter()
            assert client.get(f"{url}/health").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.01)
    thread.join()
    return slowest, results


@pytest.mark.parametrize("kind", ["declared 20 MB", "chunked 20 MB", "3 MB prompt under the body cap"])
def test_giant_prompt_is_refused_without_freezing_anyone(tiny_url, kind):
    """Before: a 20 MB prompt was refused after 33 s and /health took 32 s meanwhile. The bound
    asserted here is loose on purpose (a 2-core CI machine is noisy); the note reports the numbers."""
    if kind == "chunked 20 MB":

        def body():
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 2**20
            yield b'"}'
    else:
        size = 20 * 2**20 if kind.startswith("declared") else 3 * 2**20
        body = json.dumps({"prompt": "hello " * (size // 6)}).encode()

    def post():
        started = time.perf_counter()
        content = body() if callable(body) else body
        r = httpx.post(
            f"{tiny_url}/generate", content=content, headers={"content-type": "application/json"}, timeout=120
        )
        return r.status_code, r.json()["error"]["message"], time.perf_counter() - started

    slowest, [(status, message, took)] = _slowest_health(tiny_url, post)
    print(f"{kind}: refused {status} in {took * 1000:.0f} ms; slowest /health meanwhile {slowest * 1000:.0f} ms")
    assert status in (400, 413), message
    assert took < 10 and slowest < 1.0


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_schema_conforming_or_fuzzed_request_gets_a_5xx(tiny_url, mode):
    """schemathesis draws requests from the server's own OpenAPI document (POSITIVE: what the schema
    allows; NEGATIVE: what it forbids) for every operation; none may get a 5xx. Bounded: 30
    examples per operation and mode, derandomized so a failure reproduces."""
    schema = schemathesis.openapi.from_url(f"{tiny_url}/openapi.json")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def exercise(case) -> None:
            nonlocal calls
            response = case.call(timeout=60)
            calls += 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} body={str(case.body)[:200]!r}: "
                    f"{response.status_code} {response.text[:300]}"
                )

        try:
            exercise()
        except Unsatisfiable:  # NEGATIVE: an operation without parameters has nothing to break
            assert mode is GenerationMode.NEGATIVE
    assert calls > 50
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(f"{tiny_url}/health").json()["status"] == "ok"
