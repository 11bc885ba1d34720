"""Adapter routes: upload (multipart), list, inspect, delete, and (admins) make public.

Every route acts for its caller: uploads go to the caller's tenant; `{name}` is the caller's own
adapter `id`, or another tenant's `owner/id` (see AdapterService for who may see and change what).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters_store import AdapterInfo, AdapterTooLarge, MalformedUpload
from server.api.auth import Caller
from server.api.openapi import error_responses
from server.runtime import Runtime
from server.tenancy.principal import Principal

router = APIRouter()


def adapter_view(info: AdapterInfo, who: Principal) -> dict:
    """An adapter as the API shows it to `who`."""
    return {
        "adapter_id": info.adapter_id,
        # What this caller passes as adapter_id / model to use it: the id for its own, owner/id else.
        "name": info.adapter_id if info.tenant == who.tenant else str(info.ref),
        "owner": info.tenant,
        "public": info.public,
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
    "/adapters",
    status_code=201,
    responses=error_responses(400, 401, 403, 413, 422, 429, 500),
    openapi_extra=_UPLOAD_BODY,
)
async def upload_adapter(request: Request, who: Caller) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    cap = int(runtime.config.adapters.max_upload_mb * 2**20)
    adapter_id, config_bytes, weights_bytes = await _form_parts(request, cap)
    upload = runtime.adapters.submit_upload(adapter_id, config_bytes, weights_bytes, owner=who.tenant)
    info = await asyncio.wrap_future(upload)
    return JSONResponse(adapter_view(info, who), status_code=201)


@router.get("/adapters", responses=error_responses(401))
async def list_adapters(request: Request, who: Caller) -> dict:
    runtime: Runtime = request.app.state.runtime
    return {"adapters": [adapter_view(info, who) for info in runtime.adapters.visible(who)]}


@router.get("/adapters/{name:path}", responses=error_responses(401, 404))
async def get_adapter(name: str, request: Request, who: Caller) -> dict:
    """One adapter, with its conversion report when a conversion or merge made it (else null)."""
    runtime: Runtime = request.app.state.runtime
    info = runtime.adapters.get(name, who)
    report = await run_in_threadpool(runtime.converter.report, info)  # a cache miss reads the store
    return {**adapter_view(info, who), "conversion": report}


class AccessChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    public: StrictBool


@router.patch("/adapters/{name:path}", responses=error_responses(401, 403, 404, 422, 500))
async def change_access(name: str, change: AccessChange, request: Request, who: Caller) -> dict:
    """Admins: make an adapter public (every tenant may use it as `owner/id`) or private again."""
    runtime: Runtime = request.app.state.runtime
    info = await run_in_threadpool(runtime.adapters.set_public, name, change.public, who)
    return adapter_view(info, who)


@router.delete("/adapters/{name:path}", status_code=204, responses=error_responses(401, 403, 404, 500))
async def delete_adapter(name: str, request: Request, who: Caller) -> Response:
    runtime: Runtime = request.app.state.runtime
    await run_in_threadpool(runtime.adapters.delete, name, who)
    return Response(status_code=204)
