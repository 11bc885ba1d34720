"""create_app(): routes, error envelope, and the lifespan that runs the engine thread."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import AdapterError
from server.api import adapters, generate, ops
from server.errors import ServerError
from server.runtime import Runtime


def _error(status: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": error_type}}, status_code=status)


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
            runtime.engine.stop()

    app = FastAPI(title="adapter-server", lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(generate.router)
    app.include_router(adapters.router)
    app.include_router(ops.router)

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        if 400 <= exc.status < 500:
            runtime.metrics.requests.labels("rejected").inc()
        return _error(exc.status, exc.message, exc.error_type)

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
        if 400 <= exc.status < 500:
            runtime.metrics.requests.labels("rejected").inc()
        return _error(exc.status, exc.message, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        runtime.metrics.requests.labels("rejected").inc()
        return _error(422, _describe_validation(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "http_error")

    return app
