"""Following submitted engine requests to their end for an HTTP answer, the same way for every
generation route: `gather` the whole output (JSON answers) or `follow` the events (Server-Sent
Events). One HTTP request may have several engine requests (OpenAI's `n` choices); their events are
merged in arrival order, each tagged with its choice's index. A client that goes away (a
disconnected stream, or one polled while gathering) has every unfinished request aborted, so the
engine frees their KV slots at its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from server.api.submission import Submitted
from server.engine.engine import NON_FINITE_OUTPUT
from server.engine.request import GenerationError, TokenEvent, TokenLogprob
from server.errors import ServerError
from server.runtime import Runtime

_DISCONNECT_POLL_SECONDS = 0.25


class GenerationFailed(ServerError):
    def __init__(self, error: GenerationError | None) -> None:
        error = error or GenerationError("internal_error", "generation failed")
        super().__init__(error.message)
        self.error_type = error.kind
        # The request's own numbers broke (its adapter): the client's problem, not the server's.
        self.status = 422 if error.kind == NON_FINITE_OUTPUT.kind else 500


@dataclass(slots=True)
class Output:
    """One engine request's whole answer, gathered from its events."""

    texts: list[str] = field(default_factory=list)  # the deltas, joined by `text`
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, event: TokenEvent) -> None:
        self.texts.append(event.text)
        self.token_ids.extend(event.token_ids)
        if event.logprobs is not None:
            self.logprobs = self.logprobs if self.logprobs is not None else []
            self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens


class _Merged:
    """The events of several submitted requests as one stream of (choice index, event)."""

    def __init__(self, submitted: list[Submitted], runtime: Runtime) -> None:
        self._submitted = submitted
        self._runtime = runtime
        self._events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self._pumps = [asyncio.create_task(self._pump(i, s.events)) for i, s in enumerate(submitted)]
        self.unfinished = set(range(len(submitted)))

    async def _pump(self, index: int, events: asyncio.Queue[TokenEvent]) -> None:
        while True:
            event = await events.get()
            self._events.put_nowait((index, event))
            if event.finish_reason is not None:
                return

    async def next(self) -> tuple[int, TokenEvent]:
        """The next event of any choice."""
        index, event = await self._events.get()
        if event.finish_reason is not None:
            self.unfinished.discard(index)
        return index, event

    async def next_within(self, timeout: float) -> tuple[int, TokenEvent] | None:
        """The next event, or None when `timeout` seconds pass without one."""
        try:
            return await asyncio.wait_for(self.next(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        """Stop following; abort every request that has not finished (the client is gone, or one
        choice failed and the answer is an error)."""
        for pump in self._pumps:
            pump.cancel()
        for index in self.unfinished:
            self._runtime.engine.abort(self._submitted[index].request_id)


async def gather(submitted: list[Submitted], runtime: Runtime, http_request: Request) -> list[Output] | None:
    """Every choice's whole output, in choice order; None when the client went away first. A choice
    that ended with an error raises GenerationFailed (the other choices are aborted)."""
    merged = _Merged(submitted, runtime)
    outputs = [Output() for _ in submitted]
    next_check = time.monotonic() + _DISCONNECT_POLL_SECONDS
    try:
        while merged.unfinished:
            item = await merged.next_within(_DISCONNECT_POLL_SECONDS)
            if item is not None:
                index, event = item
                if event.finish_reason == "error":
                    raise GenerationFailed(event.error)
                outputs[index].add(event)
            if time.monotonic() >= next_check:  # tokens may arrive faster than the poll period
                next_check = time.monotonic() + _DISCONNECT_POLL_SECONDS
                if await http_request.is_disconnected():
                    return None
    finally:
        merged.close()
    return outputs


async def follow(submitted: list[Submitted], runtime: Runtime) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Every choice's events as they come, until all have finished. Whoever stops iterating early
    (Starlette cancels a stream whose client disconnected) aborts the unfinished requests; use it
    with `contextlib.aclosing` when the loop can end early."""
    merged = _Merged(submitted, runtime)
    try:
        while merged.unfinished:
            yield await merged.next()
    finally:
        merged.close()


def sse_line(payload: dict | str) -> str:
    """One Server-Sent Event: a JSON payload, or a bare word such as `[DONE]`."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def client_gone() -> JSONResponse:
    """The answer to a client that disconnected before its JSON answer was ready (nobody reads it)."""
    return JSONResponse({"error": {"message": "client disconnected", "type": "aborted"}}, 499)
