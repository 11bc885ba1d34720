"""ASGI middleware that runs before any route: request body caps and the cross-site write guard.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so streaming bodies and SSE answers pass
through untouched, and a refused request costs no parsing at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.envelope import error_body

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RequestTooLarge(HTTPException):
    """Raised from `receive` once a body passes its cap; an HTTPException so FastAPI's body reader
    passes it through unchanged instead of wrapping it into a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit}-byte limit for this route")


async def send_error(scope: Scope, send: Send, status: int, message: str, error_type: str) -> None:
    body = json.dumps(error_body(scope["path"], status, message, error_type)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Caps every request body before it is parsed: a declared Content-Length over the cap is refused
    at once (413); an undeclared (chunked) body is counted as it arrives and refused when it passes.
    `limit_for(method, path)` gives each route its cap (uploads get their own, larger one)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await send_error(
                scope,
                send,
                413,
                f"request body of {declared} bytes exceeds the {limit}-byte limit for this route",
                "request_too_large",
            )
            return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)
            return message

        await self.app(scope, capped_receive, send)


class CrossSiteWriteGuard:
    """Refuses state-changing requests sent by a web page of another origin.

    Browsers attach `Origin` to cross-site POSTs, and a multipart form or a text/plain body is sent
    without a CORS preflight, so CORS alone would not stop a page from uploading adapters to a
    developer's localhost server. Any mutating request whose Origin is not listed is answered 403
    before it is read; clients that are not browsers send no Origin and are unaffected.
    """

    def __init__(self, app: ASGIApp, allowed_origins: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in MUTATING_METHODS:
            origin = _header(scope, b"origin")
            if origin is not None and origin not in self.allowed and "*" not in self.allowed:
                await send_error(
                    scope,
                    send,
                    403,
                    f"cross-origin {scope['method']} from {origin!r} refused: list the "
                    "origin in --cors-allow-origins to allow it",
                    "cross_origin_refused",
                )
                return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None
