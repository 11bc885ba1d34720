"""One HTTP request carried between Ray Serve deployments as plain data, and run against an ASGI app.

Serve's proxy hands the router an HTTP request; the router picks a replica by adapter and calls it
through a deployment handle, which carries Python objects, not connections. So the router sends the
request as an `HttpRequest`, and the replica runs it through the FastAPI app in-process (`call_asgi`),
streaming back a `ResponseStart` and then the body chunks as the app sends them (SSE included).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    query_string: bytes
    headers: Headers  # as received, Authorization included: the replica authenticates the caller
    body: bytes
    client: tuple[str, int] | None = None
    adapter: str = ""  # the full name (owner/id) of the adapter it names, as the router read it


@dataclass(frozen=True, slots=True)
class ResponseStart:
    status: int
    headers: Headers

    def with_headers(self, extra: dict[str, str]) -> ResponseStart:
        return replace(self, headers=self.headers + [(k.encode(), v.encode()) for k, v in extra.items()])


async def call_asgi(app, request: HttpRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through `app`; yields the ResponseStart, then each non-empty body chunk. When the
    consumer stops early (the client went away), the app is told `http.disconnect`, as uvicorn would,
    so a streaming route aborts its sequence."""
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": request.client,
        "server": ("127.0.0.1", 80),
        "state": {},
    }

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)
