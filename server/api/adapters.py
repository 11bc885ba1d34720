"""Adapter routes: upload (multipart), list, inspect, delete."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters_store import AdapterInfo, AdapterTooLarge, MalformedUpload
from server.api.openapi import error_responses
from server.runtime import Runtime

router = APIRouter()


def _public(info: AdapterInfo) -> dict:
    return {
        "adapter_id": info.adapter_id,
        "version": info.version,
        "kind": info.kind,
        "rank": info.rank,
        "ranks": {str(r): n for r, n in info.rank_counts.items()},
        "target_modules": info.target_modules,
        "num_layers": info.num_layers,
        "bytes": info.bytes,
        "created_at": info.created_at,
        "projection": info.projection,
        "family": info.family,
    }


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise AdapterTooLarge(f"upload of {int(declared)} bytes exceeds the {cap}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise AdapterTooLarge(f"upload exceeds the {cap}-byte limit")
    return bytes(body)


async def _form_parts(request: Request, cap: int) -> tuple[str, bytes, bytes]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise MalformedUpload("send multipart/form-data with fields adapter_id, config and weights")
    body = await _read_capped(request, cap)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=4)
    except Exception as exc:  # python-multipart raises several types for broken bodies
        raise MalformedUpload(f"cannot parse the multipart body: {exc}") from None
    adapter_id = form.get("adapter_id")
    if not isinstance(adapter_id, str):
        raise MalformedUpload("form field 'adapter_id' (text) is missing")
    files = {}
    for name in ("config", "weights"):
        part = form.get(name)
        if not isinstance(part, UploadFile):
            raise MalformedUpload(f"file field {name!r} is missing")
        files[name] = await part.read()
    return adapter_id, files["config"], files["weights"]


# The body is read by hand (size-capped before parsing), so its shape is declared here for the docs.
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["adapter_id", "config", "weights"],
                    "properties": {
                        "adapter_id": {"type": "string"},
                        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
                        "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
                    },
                }
            }
        },
    }
}


@router.post(
    "/adapters", status_code=201, responses=error_responses(400, 403, 413, 422, 500), openapi_extra=_UPLOAD_BODY
)
async def upload_adapter(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    cap = int(runtime.config.adapters.max_upload_mb * 2**20)
    adapter_id, config_bytes, weights_bytes = await _form_parts(request, cap)
    info = await asyncio.wrap_future(runtime.adapters.submit_upload(adapter_id, config_bytes, weights_bytes))
    return JSONResponse(_public(info), status_code=201)


@router.get("/adapters")
async def list_adapters(request: Request) -> dict:
    runtime: Runtime = request.app.state.runtime
    return {"adapters": [_public(info) for info in runtime.adapters.registry.list()]}


@router.get("/adapters/{adapter_id}", responses=error_responses(404))
async def get_adapter(adapter_id: str, request: Request) -> dict:
    runtime: Runtime = request.app.state.runtime
    return _public(runtime.adapters.get(adapter_id))


@router.delete("/adapters/{adapter_id}", status_code=204, responses=error_responses(403, 404, 500))
async def delete_adapter(adapter_id: str, request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    await run_in_threadpool(runtime.adapters.delete, adapter_id)
    return Response(status_code=204)
