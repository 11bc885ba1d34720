"""A request's life inside the engine: tokens, KV blocks, progress, and when it is done."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.request import GenerationError, Request, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    request: Request
    token_ids: list[int]  # prompt followed by generated tokens
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    max_len: int  # the model context this sequence may fill
    num_computed: int = 0  # tokens whose K/V are already in the cache
    block_table: list[int] = field(default_factory=list)  # its KV blocks, in position order
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, in order (prefix cache)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    error: GenerationError | None = None  # why, when finish_reason is "error"
    first_token_time: float | None = None
    emitted_tokens: int = field(default=0)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # of sampled tokens not yet emitted
    # Tokens to compute before the next one is sampled: the prompt, or after a preemption
    # everything so far (the KV is recomputed; the tokens already sampled stay).
    prefill_end: int = -1
    preemptions: int = 0

    def __post_init__(self) -> None:
        if self.prefill_end < 0:
            self.prefill_end = len(self.request.prompt_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def version(self) -> str | None:
        return self.request.adapter_version

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def mode(self) -> str:
        return self.request.mode

    @property
    def remaining_tokens(self) -> int:
        return self.request.params.max_tokens - self.num_generated

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prefill_end

    def preempt(self) -> None:
        """Give up the KV blocks (the caller returns them); resume later by recomputing every token so
        far (then sampling the next one, exactly where decoding stopped)."""
        self.num_computed = 0
        self.prefill_end = len(self.token_ids)
        self.block_table = []
        self.block_hashes = []
        self.status = SeqStatus.WAITING
        self.preemptions += 1

    def append(self, token_id: int) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        self.token_ids.append(token_id)
        params = self.request.params
        if token_id in self.eos_token_ids and not params.ignore_eos:
            self.finish_reason = "stop"
            return
        self.detokenizer.add(token_id)
        if self.detokenizer.stopped:
            self.finish_reason = "stop"
        elif self.num_generated >= params.max_tokens or len(self.token_ids) >= self.max_len:
            self.finish_reason = "length"

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """The logprobs of the tokens about to be emitted; None when the request did not ask for them."""
        if self.request.params.logprobs is None:
            return None
        taken, self.pending_logprobs = self.pending_logprobs, []
        return taken
