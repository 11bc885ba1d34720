"""Following several engine requests (OpenAI's `n` choices) for one HTTP answer: outputs in choice
order whatever order events arrive in, and every unfinished choice aborted when the client goes away
or one choice fails. Fake queues and engine: no model needed."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from types import SimpleNamespace

import pytest

from server.api.outputs import GenerationFailed, follow, gather
from server.api.submission import Submitted
from server.engine.request import GenerationError, TokenEvent, TokenLogprob

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class FakeClient:
    def __init__(self) -> None:
        self.gone = False

    async def is_disconnected(self) -> bool:
        return self.gone


def _setup(n: int) -> tuple[list[Submitted], SimpleNamespace, list[str]]:
    aborted: list[str] = []
    runtime = SimpleNamespace(engine=SimpleNamespace(abort=aborted.append))
    return [Submitted(f"r{i}", asyncio.Queue()) for i in range(n)], runtime, aborted


def _event(request_id: str, token: int, finish: str | None = None, error: GenerationError | None = None) -> TokenEvent:
    logprobs = [TokenLogprob(token, -0.5, ((token, -0.5),))]
    return TokenEvent(request_id, [token], f"<{token}>", finish, 3, token, error, logprobs)


async def test_gather_returns_outputs_in_choice_order():
    submitted, runtime, aborted = _setup(2)
    submitted[1].events.put_nowait(_event("r1", 7))
    submitted[1].events.put_nowait(_event("r1", 8, "length"))
    submitted[0].events.put_nowait(_event("r0", 5, "stop"))
    outputs = await gather(submitted, runtime, FakeClient())
    assert [o.text for o in outputs] == ["<5>", "<7><8>"]
    assert [o.token_ids for o in outputs] == [[5], [7, 8]]
    assert [lp.token_id for lp in outputs[1].logprobs] == [7, 8]
    assert [o.finish_reason for o in outputs] == ["stop", "length"] and outputs[1].prompt_tokens == 3
    assert aborted == []


async def test_gather_aborts_every_unfinished_choice_when_the_client_goes_away():
    submitted, runtime, aborted = _setup(3)
    submitted[0].events.put_nowait(_event("r0", 1, "stop"))
    client = FakeClient()
    client.gone = True
    assert await gather(submitted, runtime, client) is None
    assert sorted(aborted) == ["r1", "r2"]


async def test_a_failed_choice_fails_the_answer_and_aborts_the_others():
    submitted, runtime, aborted = _setup(2)
    submitted[1].events.put_nowait(_event("r1", 1, "error", GenerationError("non_finite_output", "broke")))
    with pytest.raises(GenerationFailed) as caught:
        await gather(submitted, runtime, FakeClient())
    assert caught.value.status == 422 and caught.value.error_type == "non_finite_output"
    assert aborted == ["r0"]


async def test_a_stream_left_early_aborts_what_has_not_finished():
    submitted, runtime, aborted = _setup(2)
    submitted[0].events.put_nowait(_event("r0", 1, "stop"))
    async with aclosing(follow(submitted, runtime)) as events:
        async for index, event in events:
            assert (index, event.finish_reason) == (0, "stop")
            break  # the client disconnected
    assert aborted == ["r1"]
