"""What a client asks for (Request, SamplingParams) and what the engine sends back (TokenEvent)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from adapters_store.tenants import DEFAULT_TENANT

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # same seed + same request = same tokens, whatever else is batched
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = none; k = each token's logprob and its k most likely alternatives

    @property
    def greedy(self) -> bool:
        # Below this, sampling is argmax in all but name, and dividing by it overflows float32.
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True, slots=True)
class GenerationError:
    """Why a request ended with finish_reason "error". `kind` is "non_finite_output" when the
    request's own numbers broke (its adapter's fault; answered 422), "internal_error" otherwise."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token's log-probability and the `top` most likely tokens of the same step, (id,
    logprob) best first, under the distribution it was sampled from (after temperature)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A delta of one request's output; the last one has `finish_reason` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: GenerationError | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of `token_ids`, when the request asked


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent], None]  # thread-safe sink into the HTTP handler's queue
    adapter_version: str | None = None  # an adapter's identity is its version, never its name
    mode: str = "auto"  # "auto" | "gathered" | "merged" (see engine/phases.py)
    arrival_time: float = field(default=0.0)
    tenant: str = DEFAULT_TENANT  # whose request: the scheduler admits tenants round-robin
    adapter_name: str | None = None  # "owner/id" of the adapter version, for per-adapter metrics
    on_finish: Callable[[], None] | None = None  # called once by the engine when the request ends
