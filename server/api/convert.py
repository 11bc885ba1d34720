"""Conversion routes: any adapter, a weighted merge of adapters, or a full fine-tune to a LoRA, with the
Eckart–Young error of the truncation reported (docs/conversion.md).

    POST /adapters/{name}/convert     JSON {target_id, rank | max_relative_error | energy, scope}
    POST /adapters/merge              JSON {target_id, sources: [{adapter_id, weight}], combination, ...}
    POST /adapters/full-finetune      safetensors body; target and options in the query string

Each answers the new adapter as GET /adapters/{id} does, plus its `conversion` report and
`conversion_seconds`. The work runs on the conversion thread (`Converter`), never on the event loop.
A source is any adapter the caller may use; a merge takes the caller's own adapters only.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from adapters_store import AdapterInfo, AdapterNotFound, validate_adapter_id
from server.adapters.conversion import Combination, ConversionRefused, ConversionResult, Target
from server.adapters.conversion.combine import METHODS
from server.api.adapters import adapter_view
from server.api.auth import Caller
from server.api.openapi import error_responses
from server.api.schemas import Text
from server.runtime import Runtime
from server.tenancy.principal import Principal

router = APIRouter()

FULL_FINETUNE_PATH = "/adapters/full-finetune"
MAX_MERGE_SOURCES = 16
_SPOOL_CHUNK = 8 * 2**20  # the upload is written to disk in pieces of this size, off the event loop
_converter_lock = threading.Lock()


class TargetFields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    target_id: Text = Field(max_length=64, description="id of the new LoRA adapter (the caller's)")
    rank: int | None = Field(default=None, ge=1, le=2**31 - 1, strict=True, description="every layer's rank")
    max_relative_error: float | None = Field(
        default=None, ge=0.0, le=1.0, strict=True, description="Frobenius error / ‖ΔW‖_F (see scope)"
    )
    energy: float | None = Field(default=None, ge=0.0, le=1.0, strict=True, description="fraction of Σσ² kept")
    scope: Literal["total", "layer"] = Field(
        default="total", description="error over the whole adapter (ranks allocated greedily) or per layer"
    )

    @model_validator(mode="after")
    def _one_target(self) -> TargetFields:
        if sum(v is not None for v in (self.rank, self.max_relative_error, self.energy)) != 1:
            raise ValueError("give exactly one of 'rank', 'max_relative_error', 'energy'")
        return self

    def target(self, max_rank: int) -> Target:
        if self.rank is not None and self.rank > max_rank:
            raise ConversionRefused(f"rank {self.rank} is above the server's --max-lora-rank {max_rank}")
        validate_adapter_id(self.target_id)
        return Target(self.rank, self.max_relative_error, self.energy, self.scope)


class ConvertRequest(TargetFields):
    pass


class MergeSource(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    adapter_id: Text = Field(max_length=256)
    weight: float = Field(strict=True)


class MergeRequest(TargetFields):
    sources: list[MergeSource] = Field(min_length=1, max_length=MAX_MERGE_SOURCES)
    combination: Literal[METHODS] = "linear"
    density: float | None = Field(default=None, gt=0.0, le=1.0, strict=True)
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: int = Field(default=0, ge=0, le=2**63 - 1, strict=True, description="DARE's masks")

    @model_validator(mode="after")
    def _valid_combination(self) -> MergeRequest:
        self.how()  # raises ValueError, answered 422
        return self

    def how(self) -> Combination:
        return Combination(self.combination, self.density, self.majority_sign_method, self.seed)


def _answer(result: ConversionResult, who: Principal) -> JSONResponse:
    body = {**adapter_view(result.info, who), "conversion": result.report, "conversion_seconds": result.seconds}
    return JSONResponse(body, status_code=201)


_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 429, 500)


@router.post("/adapters/{name:path}/convert", status_code=201, responses=_ERRORS)
async def convert_adapter(name: str, body: ConvertRequest, request: Request, who: Caller) -> JSONResponse:
    """A LoRA from any adapter the caller may use, truncated to the target."""
    runtime: Runtime = request.app.state.runtime
    target = body.target(runtime.adapters.spec.max_rank)
    info = runtime.adapters.get(name, who)
    job = request.app.state.runtime.converter.convert(info, body.target_id, target, who.tenant)
    return _answer(await asyncio.wrap_future(job), who)


@router.post("/adapters/merge", status_code=201, responses=_ERRORS)
async def merge_adapters(body: MergeRequest, request: Request, who: Caller) -> JSONResponse:
    """One LoRA from a weighted merge of the caller's own adapters (PEFT's task arithmetic, TIES, DARE)."""
    runtime: Runtime = request.app.state.runtime
    target = body.target(runtime.adapters.spec.max_rank)
    infos = [_own(runtime, s.adapter_id, who) for s in body.sources]
    job = request.app.state.runtime.converter.merge(
        infos, [s.weight for s in body.sources], body.how(), body.target_id, target, who.tenant
    )
    return _answer(await asyncio.wrap_future(job), who)


def _own(runtime: Runtime, name: str, who: Principal) -> AdapterInfo:
    info = runtime.adapters.get(name, who)
    if info.tenant != who.tenant:  # even a public one: a merge is of the caller's own work
        raise AdapterNotFound(f"unknown adapter {name!r} (a merge takes the caller's own adapters)")
    return info


_FULL_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary", "description": "fine-tuned weights (safetensors)"}
            }
        },
    }
}


@router.post(FULL_FINETUNE_PATH, status_code=201, responses=_ERRORS, openapi_extra=_FULL_BODY)
async def convert_full_finetune(
    request: Request,
    who: Caller,
    target_id: Annotated[str, Query(max_length=64)],
    rank: Annotated[int | None, Query(ge=1)] = None,
    max_relative_error: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    energy: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    scope: Literal["total", "layer"] = "total",
    targets: Annotated[str | None, Query(max_length=4096, description="comma-separated layer names")] = None,
) -> JSONResponse:
    """A LoRA from a full fine-tune of the base model: the body is one safetensors file of fine-tuned
    weights (checkpoint names); each adaptable layer's W_ft − W0 is truncated to the target."""
    runtime: Runtime = request.app.state.runtime
    fields = {"target_id": target_id, "rank": rank, "max_relative_error": max_relative_error, "energy": energy}
    try:
        body = TargetFields.model_validate({**fields, "scope": scope})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    target = body.target(runtime.adapters.spec.max_rank)
    chosen = None if targets is None else [t.strip() for t in targets.split(",") if t.strip()]
    local_store = runtime.config.adapters_dir
    file = await _spool(request, local_store if isinstance(local_store, Path) else None)
    try:
        job = request.app.state.runtime.converter.convert_full(file, chosen, target_id, target, who.tenant)
        return _answer(await asyncio.wrap_future(job), who)
    finally:
        await run_in_threadpool(file.unlink, True)


async def _spool(request: Request, directory: Path | None) -> Path:
    """The request body, written to a temp file beside a local store (a `.tmp-` name: a crash leaves
    garbage the store's startup scan removes), or in the system's temp dir when the store is S3.
    Memory holds one chunk at a time; the size cap is this route's body limit (--max-full-finetune-mb)."""
    fd, name = tempfile.mkstemp(prefix=".tmp-full-", suffix=".safetensors", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            pending = bytearray()
            async for chunk in request.stream():
                pending += chunk
                if len(pending) >= _SPOOL_CHUNK:
                    data, pending = pending, bytearray()
                    await run_in_threadpool(f.write, data)
            await run_in_threadpool(f.write, pending)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)
