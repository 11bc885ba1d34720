"""POST /generate: validate, tokenize, submit to the engine, answer with JSON or Server-Sent Events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.auth import Caller
from server.api.openapi import error_responses
from server.api.outputs import client_gone, follow, gather, sse_line
from server.api.prompt import check_text_fits, token_budget, tokenize
from server.api.schemas import GenerateRequest, GenerateResponse, Usage
from server.api.submission import submit
from server.engine.request import SamplingParams, TokenEvent, TokenLogprob
from server.runtime import Runtime

router = APIRouter()


def _sampling_params(body: GenerateRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=token_budget(body.max_tokens, prompt_len, max_model_len),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
    )


def logprobs_json(logprobs: list[TokenLogprob]) -> list[dict]:
    return [
        {
            "token_id": lp.token_id,
            "logprob": lp.logprob,
            "top_logprobs": [{"token_id": token_id, "logprob": logprob} for token_id, logprob in lp.top],
        }
        for lp in logprobs
    ]


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=error_responses(400, 401, 403, 404, 413, 422, 429, 500),
    openapi_extra={"responses": {"200": {"content": {"text/event-stream": {}}}}},
)
async def generate(body: GenerateRequest, http_request: Request, who: Caller):
    runtime: Runtime = http_request.app.state.runtime
    check_text_fits(body.text_bytes(), runtime, "messages" if body.messages is not None else "prompt")
    messages = None if body.messages is None else [m.model_dump() for m in body.messages]
    prompt_ids = await run_in_threadpool(tokenize, runtime, body.prompt, messages)
    params = _sampling_params(body, len(prompt_ids), runtime.max_model_len)
    # In memory only (no disk, no lock held across I/O): from here the request holds its adapter
    # version until the engine finishes it; a cold version is brought in by the loader meanwhile.
    submitted = submit(runtime, who, body.adapter_id, prompt_ids, [params], body.mode)
    request_id = submitted[0].request_id
    if body.stream:
        return StreamingResponse(_sse(request_id, follow(submitted, runtime)), media_type="text/event-stream")
    outputs = await gather(submitted, runtime, http_request)
    if outputs is None:
        return client_gone()
    [output] = outputs
    answer = GenerateResponse(
        id=request_id,
        text=output.text,
        token_ids=output.token_ids,
        finish_reason=output.finish_reason,
        usage=Usage(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens),
        logprobs=None if output.logprobs is None else logprobs_json(output.logprobs),
    )
    return JSONResponse(answer.model_dump(exclude_none=True))  # `logprobs` only when asked for


async def _sse(request_id: str, events: AsyncIterator[tuple[int, TokenEvent]]) -> AsyncIterator[str]:
    async with aclosing(events):  # leaving early (the client disconnected) aborts the request
        async for _, event in events:
            payload: dict = {"id": request_id, "text": event.text, "token_ids": event.token_ids}
            if event.logprobs is not None:
                payload["logprobs"] = logprobs_json(event.logprobs)
            if event.finish_reason is not None:
                payload["finish_reason"] = event.finish_reason
                payload["usage"] = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
                if event.error:
                    payload["error"] = {"message": event.error.message, "type": event.error.kind}
            yield sse_line(payload)
    yield sse_line("[DONE]")
