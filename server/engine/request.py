"""What a client asks for (Request, SamplingParams) and what the engine sends back (TokenEvent)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = no top-k cut
    seed: int | None = None       # same seed + same request = same tokens, whatever else is batched
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A delta of one request's output; the last one has `finish_reason` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent], None]     # thread-safe sink into the HTTP handler's queue
    adapter_version: str | None = None     # an adapter's identity is its version, never its name
    mode: str = "auto"                     # "auto" | "gathered" | "merged" (see engine/phases.py)
    arrival_time: float = field(default=0.0)
