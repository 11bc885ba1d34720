"""POST /generate: validate, tokenize, submit to the engine, answer with JSON or Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.auth import Caller
from server.api.openapi import error_responses
from server.api.schemas import GenerateRequest, GenerateResponse, Usage
from server.api.submission import submit
from server.engine.engine import NON_FINITE_OUTPUT
from server.engine.request import GenerationError, SamplingParams, TokenEvent
from server.errors import InvalidRequest, ServerError
from server.runtime import Runtime

router = APIRouter()
_DISCONNECT_POLL_SECONDS = 0.25


class GenerationFailed(ServerError):
    def __init__(self, error: GenerationError | None) -> None:
        error = error or GenerationError("internal_error", "generation failed")
        super().__init__(error.message)
        self.error_type = error.kind
        # The request's own numbers broke (its adapter): the client's problem, not the server's.
        self.status = 422 if error.kind == NON_FINITE_OUTPUT.kind else 500


def _check_text_fits(body: GenerateRequest, runtime: Runtime) -> None:
    """Refuse text that cannot fit the context before spending CPU on tokenizing it."""
    limit = runtime.max_model_len * runtime.tokenizer.max_bytes_per_token
    size = body.text_bytes()
    if size > limit:
        raise InvalidRequest(
            f"the prompt is {size} bytes of text; the context holds {runtime.max_model_len} "
            f"tokens and no token covers more than {runtime.tokenizer.max_bytes_per_token} "
            "bytes, so it cannot fit"
        )


def _prompt_ids(body: GenerateRequest, runtime: Runtime) -> list[int]:
    """Tokenize (CPU-heavy: runs in a worker thread, never on the event loop)."""
    tokenizer = runtime.tokenizer
    if body.messages is not None:
        ids = tokenizer.encode_chat([m.model_dump() for m in body.messages])
    else:
        ids = tokenizer.encode(body.prompt)
    if not ids:
        raise InvalidRequest("the prompt encodes to zero tokens")
    if len(ids) >= runtime.max_model_len:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens; the context holds {runtime.max_model_len} "
            "including at least one generated token"
        )
    return ids


def _sampling_params(body: GenerateRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    room = max_model_len - prompt_len
    if body.max_tokens is not None and body.max_tokens > room:
        raise InvalidRequest(
            f"max_tokens={body.max_tokens} plus the {prompt_len}-token prompt exceeds the "
            f"context of {max_model_len} tokens (at most {room} new tokens fit)"
        )
    return SamplingParams(
        max_tokens=body.max_tokens or room,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
    )


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=error_responses(400, 401, 403, 404, 413, 422, 429, 500),
    openapi_extra={"responses": {"200": {"content": {"text/event-stream": {}}}}},
)
async def generate(body: GenerateRequest, http_request: Request, who: Caller):
    runtime: Runtime = http_request.app.state.runtime
    _check_text_fits(body, runtime)
    prompt_ids = await run_in_threadpool(_prompt_ids, body, runtime)
    params = _sampling_params(body, len(prompt_ids), runtime.max_model_len)
    # In memory only (no disk, no lock held across I/O): from here the request holds its adapter
    # version until the engine finishes it; a cold version is brought in by the loader meanwhile.
    [submitted] = submit(runtime, who, body.adapter_id, prompt_ids, [params], body.mode)
    request_id, events = submitted.request_id, submitted.events
    if body.stream:
        return StreamingResponse(_sse(request_id, events, runtime), media_type="text/event-stream")
    return await _collect(request_id, events, runtime, http_request)


async def _collect(
    request_id: str, events: asyncio.Queue[TokenEvent], runtime: Runtime, http_request: Request
) -> JSONResponse:
    """Gather the whole answer; if the client goes away first, abort so its KV slot is freed."""
    text, token_ids = [], []
    next_check = time.monotonic() + _DISCONNECT_POLL_SECONDS
    while True:
        try:
            event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_SECONDS)
        except TimeoutError:
            event = None
        if event is not None:
            text.append(event.text)
            token_ids.extend(event.token_ids)
            if event.finish_reason is not None:
                break
        if time.monotonic() >= next_check:  # tokens may arrive faster than the poll period
            next_check = time.monotonic() + _DISCONNECT_POLL_SECONDS
            if await http_request.is_disconnected():
                runtime.engine.abort(request_id)
                return JSONResponse({"error": {"message": "client disconnected", "type": "aborted"}}, 499)
    if event.finish_reason == "error":
        raise GenerationFailed(event.error)
    return JSONResponse(
        GenerateResponse(
            id=request_id,
            text="".join(text),
            token_ids=token_ids,
            finish_reason=event.finish_reason,
            usage=Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
        ).model_dump()
    )


def _sse_line(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _sse(request_id: str, events: asyncio.Queue[TokenEvent], runtime: Runtime) -> AsyncIterator[str]:
    finished = False
    try:
        while not finished:
            event = await events.get()
            finished = event.finish_reason is not None
            payload: dict = {"id": request_id, "text": event.text, "token_ids": event.token_ids}
            if finished:
                payload["finish_reason"] = event.finish_reason
                payload["usage"] = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
                if event.error:
                    payload["error"] = {"message": event.error.message, "type": event.error.kind}
            yield _sse_line(payload)
        yield _sse_line("[DONE]")
    finally:
        if not finished:  # the client disconnected mid-stream (Starlette cancelled us)
            runtime.engine.abort(request_id)
