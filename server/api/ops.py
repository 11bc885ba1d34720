"""Operational endpoints: GET /health and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.auth import admin
from server.api.openapi import error_responses
from server.runtime import Runtime

router = APIRouter()


@router.get("/health", responses=error_responses(503))
async def health(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    status = runtime.engine.status()
    body = {
        "status": "ok" if status.alive else "engine_down",
        "model": runtime.model_name,  # the name only: the path is the operator's business
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "max_model_len": runtime.max_model_len,
        "kv_blocks": status.kv_blocks,
        "kv_blocks_used": status.kv_blocks_used,
        "running": status.running,
        "waiting": status.waiting,
        "phase": status.phase,
        "kernel_backend": status.kernel_backend,
    }
    return JSONResponse(body, status_code=200 if status.alive else 503)


@router.get("/metrics", responses=error_responses(401, 403))
async def metrics(request: Request) -> Response:
    """Prometheus text. With API keys configured, an admin key is needed: the per-tenant series name
    tenants and adapters (Prometheus sends it with `authorization: {credentials: ...}`)."""
    runtime: Runtime = request.app.state.runtime
    await admin(request)
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
