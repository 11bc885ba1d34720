"""Hand generation requests to the engine on behalf of a caller: the one path every generation route
(`/generate`, `/v1/completions`, `/v1/chat/completions`) takes.

Order matters: the request gate first (a refused request costs nothing), then the adapter is
resolved (in memory; from here the request holds its version), then the engine gets the requests.
The engine calls each request's `on_finish` exactly once, whatever way it ends, which gives the
gate its slot back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from server.engine.request import Request as EngineRequest
from server.engine.request import SamplingParams, TokenEvent
from server.runtime import Runtime
from server.tenancy.principal import Principal


@dataclass(frozen=True, slots=True)
class Submitted:
    request_id: str
    events: asyncio.Queue[TokenEvent]  # the engine's events for this request, in order


def new_request_id(prefix: str = "gen") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def submit(
    runtime: Runtime,
    caller: Principal,
    adapter: str | None,
    prompt_ids: list[int],
    choices: list[SamplingParams],
    mode: str | None = None,
    id_prefix: str = "gen",
) -> list[Submitted]:
    """Submit one engine request per entry of `choices` (all admitted or none). `adapter` is an
    adapter name as the caller sees it (`id`, or `owner/id` for another tenant's public adapter),
    None for the base model. Raises LimitExceeded (429) or AdapterNotFound (404)."""
    gate, tenant = runtime.gate, caller.tenant
    gate.enter(tenant, len(choices))
    try:
        held = [None if adapter is None else runtime.adapters.resolve_info(adapter, caller) for _ in choices]
    except BaseException:
        gate.leave(tenant, len(choices))  # resolve holds all versions or raises before the first
        raise
    loop = asyncio.get_running_loop()
    submitted = []
    for params, info in zip(choices, held, strict=True):
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        request_id = new_request_id(id_prefix)
        runtime.engine.submit(
            EngineRequest(
                request_id,
                prompt_ids,
                params,
                emit=lambda ev, q=events: loop.call_soon_threadsafe(q.put_nowait, ev),
                adapter_version=None if info is None else info.version,
                arrival_time=time.perf_counter(),
                mode=mode or runtime.config.adapters.mode,
                tenant=tenant,
                adapter_name=None if info is None else str(info.ref),
                on_finish=lambda: gate.leave(tenant),
            )
        )
        submitted.append(Submitted(request_id, events))
    return submitted
