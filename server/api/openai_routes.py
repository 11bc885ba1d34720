"""The OpenAI-compatible API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

`model` is the base model's name (what /health reports) or an adapter's name as the caller sees it
(its own `id`, another tenant's public `owner/id`); the base model's name wins over an adapter of the
same name. Requests take the same path as /generate (same checks, `submit`, engine, outputs); `n`
choices are `n` engine requests, and with a `seed` choice i samples with seed + i, so each choice
is reproducible and equals a /generate request with that seed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from adapters_store import AdapterInfo, AdapterNotFound
from server.api.auth import Caller
from server.api.envelope import OPENAI_PREFIX, error_body
from server.api.openai_format import AnswerFormat, ChatFormat, CompletionFormat
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from server.api.openapi import error_responses
from server.api.outputs import GenerationFailed, client_gone, follow, gather, sse_line
from server.api.prompt import check_prompt_ids, check_text_fits, token_budget, tokenize
from server.api.schemas import OpenAIErrorResponse
from server.api.submission import submit
from server.engine.request import SamplingParams, TokenEvent
from server.errors import InvalidField, ServerError
from server.runtime import Runtime
from server.tenancy.principal import Principal

router = APIRouter(prefix=OPENAI_PREFIX, tags=["OpenAI-compatible"])

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)
_SERVING_SINCE = int(time.time())  # the base model's `created`: when this process started serving it
_BASE_OWNER = "system"


class ModelNotFound(ServerError):
    status = 404
    error_type = "model_not_found"
    param = "model"

    def __init__(self, model: str) -> None:
        super().__init__(f"the model {model!r} does not exist or you do not have access to it")


def _errors(*statuses: int) -> dict:
    """error_responses() with OpenAI's error body."""
    return {status: {**spec, "model": OpenAIErrorResponse} for status, spec in error_responses(*statuses).items()}


_SSE = {"200": {"content": {"text/event-stream": {}}}}


# ---- models --------------------------------------------------------------------------------------
def _card(model_id: str, created: int, owned_by: str) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def _adapter_card(info: AdapterInfo, who: Principal) -> dict:
    name = info.adapter_id if info.tenant == who.tenant else str(info.ref)
    return _card(name, int(info.created_at), info.tenant)


@router.get("/models", responses=_errors(401))
async def list_models(http_request: Request, who: Caller) -> dict:
    """The base model and every adapter the caller may use, by the name it passes as `model`."""
    runtime: Runtime = http_request.app.state.runtime
    adapters = [_adapter_card(info, who) for info in runtime.adapters.visible(who)]
    return {"object": "list", "data": [_card(runtime.model_name, _SERVING_SINCE, _BASE_OWNER), *adapters]}


@router.get("/models/{model:path}", responses=_errors(401, 404))
async def retrieve_model(model: str, http_request: Request, who: Caller) -> dict:
    runtime: Runtime = http_request.app.state.runtime
    if model == runtime.model_name:
        return _card(model, _SERVING_SINCE, _BASE_OWNER)
    try:
        return _adapter_card(runtime.adapters.get(model, who), who)
    except AdapterNotFound:
        raise ModelNotFound(model) from None


# ---- generation ----------------------------------------------------------------------------------
def _adapter_of(model: str, runtime: Runtime, who: Principal) -> str | None:
    """The adapter name `model` stands for (None: the base model); 404 before any work when unknown."""
    if model == runtime.model_name:
        return None
    try:
        runtime.adapters.get(model, who)  # in memory; `submit` resolves it again and holds it
    except AdapterNotFound:
        raise ModelNotFound(model) from None
    return model


def _choice_count(body: OpenAIRequest, runtime: Runtime) -> int:
    n = 1 if body.n is None else body.n
    if n > runtime.config.max_n:
        raise InvalidField("n", f"n={n} is over this server's limit of {runtime.config.max_n} choices (--max-n)")
    return n


def _choices(body: OpenAIRequest, n: int, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
    return [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's defaults
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=None if body.seed is None else (body.seed + i) % 2**63,
            stop=body.stop_strings(),
            logprobs=logprobs,
        )
        for i in range(n)
    ]


@router.post(
    "/completions", responses=_errors(400, 401, 403, 404, 413, 422, 429, 500), openapi_extra={"responses": _SSE}
)
async def completions(body: CompletionRequest, http_request: Request, who: Caller):
    runtime: Runtime = http_request.app.state.runtime
    adapter, n = _adapter_of(body.model, runtime, who), _choice_count(body, runtime)
    if isinstance(body.prompt, str):
        check_text_fits(len(body.prompt.encode()), runtime, "prompt")
        prompt_ids = await run_in_threadpool(tokenize, runtime, body.prompt, None)
    else:
        prompt_ids = check_prompt_ids(body.prompt, runtime, "prompt")
    max_tokens = token_budget(body.max_tokens, len(prompt_ids), runtime.max_model_len)
    if body.max_tokens is None:
        max_tokens = min(max_tokens, DEFAULT_COMPLETION_TOKENS)
    choices = _choices(body, n, max_tokens, body.logprobs)
    return await _answer(body, adapter, prompt_ids, choices, CompletionFormat, "cmpl", http_request, who)


@router.post(
    "/chat/completions", responses=_errors(400, 401, 403, 404, 413, 422, 429, 500), openapi_extra={"responses": _SSE}
)
async def chat_completions(body: ChatCompletionRequest, http_request: Request, who: Caller):
    runtime: Runtime = http_request.app.state.runtime
    adapter, n = _adapter_of(body.model, runtime, who), _choice_count(body, runtime)
    check_text_fits(body.text_bytes(), runtime, "messages")
    prompt_ids = await run_in_threadpool(tokenize, runtime, None, [m.model_dump() for m in body.messages])
    # OpenAI renamed chat's max_tokens to max_completion_tokens; both are accepted (equal if both given).
    param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = token_budget(getattr(body, param), len(prompt_ids), runtime.max_model_len, param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    choices = _choices(body, n, max_tokens, logprobs)
    return await _answer(body, adapter, prompt_ids, choices, ChatFormat, "chatcmpl", http_request, who)


async def _answer(
    body: OpenAIRequest,
    adapter: str | None,
    prompt_ids: list[int],
    choices: list[SamplingParams],
    format_class: type[AnswerFormat],
    id_prefix: str,
    http_request: Request,
    who: Principal,
):
    runtime: Runtime = http_request.app.state.runtime
    try:
        submitted = submit(runtime, who, adapter, prompt_ids, choices, id_prefix=id_prefix)
    except AdapterNotFound:  # deleted since _adapter_of looked
        raise ModelNotFound(body.model) from None
    fmt = format_class(submitted[0].request_id, body.model, runtime.tokenizer, len(choices), body.include_usage)
    if body.stream:
        return StreamingResponse(_stream(fmt, follow(submitted, runtime)), media_type="text/event-stream")
    outputs = await gather(submitted, runtime, http_request)
    if outputs is None:
        return client_gone()
    return JSONResponse(fmt.whole(outputs))


async def _stream(fmt: AnswerFormat, events: AsyncIterator[tuple[int, TokenEvent]]) -> AsyncIterator[str]:
    for chunk in fmt.opening():
        yield sse_line(chunk)
    async with aclosing(events):  # leaving early (disconnect, a failed choice) aborts the unfinished
        async for index, event in events:
            if event.finish_reason == "error":  # the SDK raises an APIError for an `error` event
                failed = GenerationFailed(event.error)
                yield sse_line(error_body(OPENAI_PREFIX, failed.status, failed.message, failed.error_type))
                return
            chunk = fmt.chunk(index, event)
            if chunk is not None:
                yield sse_line(chunk)
    if fmt.include_usage:
        yield sse_line(fmt.usage_chunk())
    yield sse_line("[DONE]")
