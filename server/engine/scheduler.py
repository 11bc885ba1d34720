"""Continuous batching policy (pure Python, no tensors).

Each step: every running sequence that is decoding contributes one token; sequences still in their
prompt continue with a chunk; then waiting requests are admitted in arrival order while a KV slot is
free and the step's token budget lasts — each once its adapter version is in host memory (the loader
brings cold ones in meanwhile) and has a device slot (when every slot is used by running sequences,
it waits; others behind it may go first). A waiting request whose adapter could not be loaded ends
with an error. Long prompts are split into chunks so decodes never stall behind them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.adapters.slot_table import SlotTable
from server.engine.kv_slots import KVSlotAllocator
from server.engine.request import GenerationError
from server.engine.sequence import SeqStatus, Sequence


class HostTier(Protocol):
    """What admission needs to know of the host cache."""

    def resident(self, version: str) -> bool: ...
    def load_error(self, version: str) -> str | None: ...


@dataclass(slots=True)
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)  # one token each, sorted by KV slot
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    failed: list[Sequence] = field(default_factory=list)  # ended before running (load failed)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    def sampled(self) -> list[Sequence]:
        """Sequences that get a new token after this step, in logits-row order."""
        done_prompt = [s for s, n in self.prefills if s.num_computed + n == s.num_prompt]
        return self.decodes + done_prompt


class Scheduler:
    def __init__(
        self,
        kv_slots: KVSlotAllocator,
        max_batched_tokens: int,
        adapter_slots: SlotTable,
        host: HostTier,
        running_cap: Callable[[str], int] | None = None,
    ) -> None:
        self.kv_slots = kv_slots
        self.running_cap = running_cap or (lambda tenant: kv_slots.num_slots)
        self.adapter_slots = adapter_slots
        self.host = host
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._released_kv: list[int] = []  # KV slots freed since the last step, to be wiped first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def unfinished(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def schedule(self, admits: Callable[[str | None], bool] = lambda version: True) -> ScheduledBatch:
        """`admits(version)` says which adapter versions may run this step (merged phases)."""
        batch = ScheduledBatch()
        budget = self.max_batched_tokens
        for seq in sorted(self.running, key=lambda s: s.kv_slot):
            if budget == 0:
                break
            if not admits(seq.version):
                continue  # paused: its KV stays valid, only the weights change meanwhile
            if seq.in_prefill:
                n = min(seq.num_prompt - seq.num_computed, budget)
                batch.prefills.append((seq, n))
            else:
                n = 1
                batch.decodes.append(seq)
            budget -= n
        for seq in list(self.waiting):
            if budget == 0 or self.kv_slots.num_free == 0:
                break
            version = seq.version
            if version is not None:
                error = self.host.load_error(version)
                if error is not None:
                    self._fail_waiting(seq, error, batch)
                    continue
                if not admits(version) or not self.host.resident(version):
                    continue  # held back by a merged phase, or the loader is still bringing it in
                if self.adapter_slots.acquire(version, {s.version for s in self.running}) is None:
                    continue  # every adapter slot is used by running sequences: wait
            elif not admits(version):
                continue
            self.waiting.remove(seq)
            seq.kv_slot = self.kv_slots.allocate()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_prompt, budget)
            batch.prefills.append((seq, n))
            budget -= n
        return batch

    def postprocess(self, batch: ScheduledBatch, tokens: list[int | None]) -> list[Sequence]:
        """Advance progress, append sampled tokens (in `batch.sampled()` order; None = that row could
        not be sampled and its sequence ends with an error); return the finished sequences."""
        sampled = batch.sampled()
        for seq in batch.decodes:
            seq.num_computed += 1
        for seq, n in batch.prefills:
            seq.num_computed += n
        for seq, token in zip(sampled, tokens, strict=True):
            if token is None:
                seq.finish_reason = "error"
            else:
                seq.append(token)
        finished = [s for s in sampled if s.finish_reason is not None]
        for seq in finished:
            self._release(seq)
        return finished

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish_reason = "abort"
                seq.status = SeqStatus.FINISHED
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                seq.finish_reason = "abort"
                self._release(seq)
                return seq
        return None

    def take_released_kv(self) -> list[int]:
        """KV slots freed since the last call; the runner wipes them before the next forward."""
        released, self._released_kv = self._released_kv, []
        return released

    def _fail_waiting(self, seq: Sequence, message: str, batch: ScheduledBatch) -> None:
        self.waiting.remove(seq)
        seq.finish_reason = "error"
        seq.error = GenerationError("adapter_load_failed", message)
        seq.status = SeqStatus.FINISHED
        batch.failed.append(seq)

    def _release(self, seq: Sequence) -> None:
        seq.status = SeqStatus.FINISHED
        self.running.remove(seq)
        self.kv_slots.free(seq.kv_slot)
        self._released_kv.append(seq.kv_slot)
        seq.kv_slot = None
