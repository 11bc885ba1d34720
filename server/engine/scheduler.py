"""Continuous batching policy (pure Python, no tensors).

Each step: every running sequence that is decoding contributes one token; sequences still in their
prompt continue with a chunk; then waiting requests are admitted while a KV slot is free and the
step's token budget lasts — each once its adapter version is in host memory (the loader brings cold
ones in meanwhile) and has a device slot (when every slot is used by running sequences, it waits;
others behind it may go first). A waiting request whose adapter could not be loaded ends with an
error. Long prompts are split into chunks so decodes never stall behind them.

Fairness across tenants: waiting requests are admitted round-robin across tenants (`FairQueue`),
each tenant at most `running_cap(tenant)` at once. When every KV slot is taken and a tenant with
waiting work runs fewer than its fair share (slots / tenants with work), the youngest sequence of
the tenant furthest over its share is *preempted*: its KV slot goes to the waiting tenant, and it
resumes later by recomputing its tokens (it keeps every token it has sampled; seeded sampling
continues its own random stream). So one tenant's flood cannot hold every slot while another waits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.adapters.slot_table import SlotTable
from server.engine.fair_queue import FairQueue
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
    preempted: list[Sequence] = field(default_factory=list)  # gave their KV slot to another tenant

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    def sampled(self) -> list[Sequence]:
        """Sequences that get a new token after this step, in logits-row order."""
        done_prompt = [s for s, n in self.prefills if s.num_computed + n == s.prefill_end]
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
        self.waiting: FairQueue[Sequence] = FairQueue()
        self.running: list[Sequence] = []  # in admission order: the youngest last
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
        self._preempt_for_fairness(admits, batch)
        budget = self.max_batched_tokens
        for seq in sorted(self.running, key=lambda s: s.kv_slot):
            if budget == 0:
                break
            if not admits(seq.version):
                continue  # paused: its KV stays valid, only the weights change meanwhile
            if seq.in_prefill:
                n = min(seq.prefill_end - seq.num_computed, budget)
                batch.prefills.append((seq, n))
            else:
                n = 1
                batch.decodes.append(seq)
            budget -= n
        running = Counter(s.tenant for s in self.running)
        for seq in self.waiting.in_turn(running):
            if budget == 0 or self.kv_slots.num_free == 0:
                break
            if running[seq.tenant] >= self.running_cap(seq.tenant) or not self._ready(seq, admits, batch):
                continue
            self._admit(seq)
            running[seq.tenant] += 1
            n = min(seq.prefill_end, budget)
            batch.prefills.append((seq, n))
            budget -= n
        return batch

    def _ready(self, seq: Sequence, admits: Callable[[str | None], bool], batch: ScheduledBatch) -> bool:
        """Whether a waiting sequence can run now (ends it if its adapter could not be loaded)."""
        version = seq.version
        if version is None:
            return admits(version)
        error = self.host.load_error(version)
        if error is not None:
            self._fail_waiting(seq, error, batch)
            return False
        if not admits(version) or not self.host.resident(version):
            return False  # held back by a merged phase, or the loader is still bringing it in
        # None: every adapter slot is used by running sequences, so it waits.
        return self.adapter_slots.acquire(version, {s.version for s in self.running}) is not None

    def _admit(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.waiting.served(seq.tenant)
        seq.kv_slot = self.kv_slots.allocate()
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def _preempt_for_fairness(self, admits: Callable[[str | None], bool], batch: ScheduledBatch) -> None:
        """Free a KV slot for each tenant that waits below its fair share while all slots are taken,
        from the tenant furthest above its share (see the module docstring)."""
        if self.kv_slots.num_free or not self.waiting:
            return
        running = Counter(s.tenant for s in self.running)
        fair_share = max(1, self.kv_slots.num_slots // len(set(running) | self.waiting.tenants()))
        starved: set[str] = set()  # tenants below their share with a sequence that could run now
        for seq in self.waiting.in_turn(running):
            tenant = seq.tenant
            if tenant in starved or running[tenant] >= min(fair_share, self.running_cap(tenant)):
                continue
            if seq.version is None or (admits(seq.version) and self.host.resident(seq.version)):
                starved.add(tenant)
        for _ in range(len(starved)):
            over, count = running.most_common(1)[0]
            if count <= fair_share:
                return
            victim = next(s for s in reversed(self.running) if s.tenant == over)
            self._release(victim, finished=False)
            victim.preempt()
            self.waiting.appendleft(victim)
            batch.preempted.append(victim)
            running[over] -= 1

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

    def _release(self, seq: Sequence, finished: bool = True) -> None:
        if finished:
            seq.status = SeqStatus.FINISHED
        self.running.remove(seq)
        self.kv_slots.free(seq.kv_slot)
        self._released_kv.append(seq.kv_slot)
        seq.kv_slot = None
