"""Start the server as a real uvicorn process on 127.0.0.1 for tests that need one."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_server(model_dir: Path, adapters_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """Start a server process serving `model_dir` in float32; (process, base URL) once it is healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--dtype", "float32", "--port", str(port)]
    # Eager: these tests are about HTTP behaviour; the compiled decode step has its own (tests/test_compile_decode.py).
    cmd += ["--adapters-dir", str(adapters_dir), "--log-level", "warning", "--no-compile", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 120, "the server to start")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


@contextmanager
def live_server(model_dir: Path, adapters_dir: Path, *flags: str) -> Iterator[str]:
    """Yield the base URL of a server process serving `model_dir` in float32; stop it afterwards."""
    proc, url = start_server(model_dir, adapters_dir, *flags)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
