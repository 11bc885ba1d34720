"""create_app(): routes, guards, error envelope, and the lifespan that runs the engine thread."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import AdapterError
from server.api import adapters, convert, generate, openai_routes, ops
from server.api.envelope import error_response, is_openai, validation_details
from server.api.guards import MUTATING_METHODS, BodyLimit, CrossSiteWriteGuard, RequestTooLarge
from server.api.schemas import UNDECODABLE_TEXT
from server.errors import ServerError
from server.runtime import Runtime

log = logging.getLogger(__name__)

# Validation errors that mean "these bytes are not JSON / not text" rather than "a field is wrong".
_UNDECODABLE = {"json_invalid", "string_unicode", UNDECODABLE_TEXT}


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{location}: {err.get('msg')}" if location else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.engine.start()
        try:
            yield
        finally:
            # Uvicorn has let running requests finish (or cut them at --shutdown-timeout-s). An upload
            # still being published completes: a publish is never left half done.
            runtime.converter.drain()  # its results publish through the upload worker: first
            runtime.adapters.drain_uploads()
            runtime.engine.stop()

    app = FastAPI(title="adapter-server", lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(generate.router)
    app.include_router(adapters.router)
    app.include_router(ops.router)
    app.include_router(openai_routes.router)
    app.include_router(convert.router)

    config = runtime.config
    upload_cap = int(config.adapters.max_upload_mb * 2**20)
    request_cap = int(config.max_request_mb * 2**20)
    full_finetune_cap = int(config.adapters.max_full_finetune_mb * 2**20)

    def body_limit(method: str, path: str) -> int:
        if method in MUTATING_METHODS and path.rstrip("/") == convert.FULL_FINETUNE_PATH:
            return full_finetune_cap
        return upload_cap if method in MUTATING_METHODS and path.rstrip("/") == "/adapters" else request_cap

    # Added innermost first: CORS answers preflights, the guard refuses cross-site writes, and the
    # body cap runs before anything reads the body.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=sorted(config.allowed_origins),
        allow_methods=["GET", "POST", "PATCH", "DELETE"],
        allow_headers=["authorization", "content-type"],
    )
    app.add_middleware(CrossSiteWriteGuard, allowed_origins=config.allowed_origins)
    app.add_middleware(BodyLimit, limit_for=body_limit)

    def count_unserved(status: int) -> None:
        """A request answered without generating: a 4xx is `rejected`, a 5xx an `error`."""
        runtime.metrics.requests.labels("rejected" if status < 500 else "error").inc()

    def unserved(
        request: Request,
        status: int,
        message: str,
        kind: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> JSONResponse:
        """Count the request, and answer in the envelope of its route (OpenAI's on /v1)."""
        count_unserved(status)
        return error_response(request.url.path, status, message, kind, param, headers)

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return unserved(request, exc.status, exc.message, exc.error_type, exc.headers, getattr(exc, "param", None))

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
        return unserved(request, exc.status, exc.message, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if is_openai(request.url.path):  # OpenAI answers every malformed body with a 400
            code, param = validation_details(exc.errors())
            return unserved(request, 400, _describe_validation(exc), code, param=param)
        status = 400 if any(err.get("type") in _UNDECODABLE for err in exc.errors()) else 422
        return unserved(request, status, _describe_validation(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "request_too_large" if isinstance(exc, RequestTooLarge) else "http_error"
        return unserved(request, exc.status_code, str(exc.detail), kind, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback, counted, and answered in the usual envelope.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return unserved(request, 500, f"internal error: {type(exc).__name__}", "internal_error")

    return app
