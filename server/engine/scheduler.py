"""Continuous batching policy (pure Python, no tensors).

Each step: every running sequence that is decoding contributes one token; sequences still in their
prompt continue with a chunk; then waiting requests are admitted while fewer than `max_num_seqs`
run, the KV cache has blocks for their prompt and the step's token budget lasts — each once its
adapter version is in host memory (the loader brings cold ones in meanwhile) and has a device slot
(when every slot is used by running sequences, it waits; others behind it may go first). A waiting
request whose adapter could not be loaded ends with an error. Long prompts are split into chunks so
decodes never stall behind them.

KV blocks (block_pool.py) are taken as sequences grow. A new sequence starts on the longest run of
its prompt's blocks found in the prefix cache and computes only the rest. When a running sequence
needs a block and none is left, the youngest running sequence is *preempted*: it gives its blocks
back and resumes later by recomputing its tokens (it keeps every token it has sampled; seeded
sampling continues its own random stream) — never a crash, never a wrong token.

Fairness across tenants: waiting requests are admitted round-robin across tenants (`FairQueue`),
each tenant at most `running_cap(tenant)` at once. When the engine is full (`max_num_seqs` running,
or too few blocks) and a tenant with waiting work runs fewer than its fair share (`max_num_seqs` /
tenants with work), the youngest sequence of the tenant furthest over its share is preempted for it.
So one tenant's flood cannot hold the engine while another waits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.adapters.slot_table import SlotTable
from server.engine.block_pool import BlockPool, block_hash
from server.engine.fair_queue import FairQueue
from server.engine.request import GenerationError
from server.engine.sequence import SeqStatus, Sequence


class HostTier(Protocol):
    """What admission needs to know of the host cache."""

    def resident(self, version: str) -> bool: ...
    def load_error(self, version: str) -> str | None: ...


@dataclass(slots=True)
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)  # one token each
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
        blocks: BlockPool,
        max_num_seqs: int,
        max_batched_tokens: int,
        adapter_slots: SlotTable,
        host: HostTier,
        running_cap: Callable[[str], int] | None = None,
        prefix_caching: bool = True,
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.adapter_slots = adapter_slots
        self.host = host
        self.max_batched_tokens = max_batched_tokens
        self.running_cap = running_cap or (lambda tenant: max_num_seqs)
        self.prefix_caching = prefix_caching
        self.waiting: FairQueue[Sequence] = FairQueue()
        self.running: list[Sequence] = []  # in admission order: the youngest last

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
        for seq in list(self.running):  # oldest first: when blocks run out, the youngest give way
            if budget == 0:
                break
            if seq not in self.running or not admits(seq.version):
                continue  # preempted below for an older one; or paused by a merged phase (KV kept)
            n = min(seq.prefill_end - seq.num_computed, budget) if seq.in_prefill else 1
            if not self._grow_or_preempt(seq, seq.num_computed + n, batch):
                continue  # it was the youngest, and gave its own blocks up
            if seq.in_prefill:
                batch.prefills.append((seq, n))
            else:
                batch.decodes.append(seq)
            budget -= n
        running = Counter(s.tenant for s in self.running)
        for seq in self.waiting.in_turn(running):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if running[seq.tenant] >= self.running_cap(seq.tenant) or not self._ready(seq, admits, batch):
                continue
            if not self._admit(seq):
                break  # not enough KV blocks for its prompt: later ones wait too (no overtaking)
            running[seq.tenant] += 1
            n = min(seq.prefill_end - seq.num_computed, budget)
            self._grow(seq, seq.num_computed + n)  # within what _admit checked is available
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

    def _admit(self, seq: Sequence) -> bool:
        """Start a waiting sequence on its cached prefix, if there are blocks for the rest of its
        prompt; False (and nothing changed) otherwise."""
        cached = self._cached_prefix(seq)
        needed = self.blocks.blocks_for(seq.prefill_end) - len(cached)
        if needed > self.blocks.num_available:
            self.blocks.release(cached)
            return False
        self.waiting.remove(seq)
        self.waiting.served(seq.tenant)
        seq.block_table = cached
        seq.num_computed = len(cached) * self.blocks.block_size
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return True

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache that hold the start of the sequence's tokens (shared from now
        on). At least the last token is always computed: its logits are what gets sampled."""
        if not self.prefix_caching:
            return []
        size = self.blocks.block_size
        hashes: list[bytes] = []
        previous = b""
        for i in range((seq.prefill_end - 1) // size):
            previous = block_hash(previous, seq.tenant, seq.version, seq.token_ids[i * size : (i + 1) * size])
            hashes.append(previous)
        cached = self.blocks.cached_prefix(hashes)
        self.blocks.note_lookup(seq.prefill_end, len(cached) * size)
        seq.block_hashes = hashes[: len(cached)]
        return cached

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Give the sequence blocks for positions [0, tokens); False when the pool has run out."""
        while len(seq.block_table) * self.blocks.block_size < tokens:
            block = self.blocks.allocate()
            if block is None:
                return False
            seq.block_table.append(block)
        return True

    def _grow_or_preempt(self, seq: Sequence, tokens: int, batch: ScheduledBatch) -> bool:
        """`_grow`, preempting the youngest running sequences while blocks are short; False if `seq`
        itself was the youngest and was preempted."""
        while not self._grow(seq, tokens):
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def register_full_blocks(self, seqs: list[Sequence]) -> None:
        """After a step: every block these sequences filled joins the prefix cache."""
        if not self.prefix_caching:
            return
        size = self.blocks.block_size
        for seq in seqs:
            for i in range(len(seq.block_hashes), min(seq.num_computed // size, len(seq.block_table))):
                previous = seq.block_hashes[-1] if seq.block_hashes else b""
                h = block_hash(previous, seq.tenant, seq.version, seq.token_ids[i * size : (i + 1) * size])
                seq.block_hashes.append(h)
                self.blocks.register(seq.block_table[i], h)

    def _preempt(self, victim: Sequence, batch: ScheduledBatch) -> None:
        self._release(victim, finished=False)
        victim.preempt()
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)

    def _preempt_for_fairness(self, admits: Callable[[str | None], bool], batch: ScheduledBatch) -> None:
        """Free room for each tenant that waits below its fair share while the engine is full, from
        the tenant furthest above its share (see the module docstring)."""
        if not self.waiting:
            return
        running = Counter(s.tenant for s in self.running)
        fair_share = max(1, self.max_num_seqs // len(set(running) | self.waiting.tenants()))
        starved: list[Sequence] = []  # each starved tenant's first sequence that could run now
        for seq in self.waiting.in_turn(running):
            tenant = seq.tenant
            if any(s.tenant == tenant for s in starved) or running[tenant] >= min(fair_share, self.running_cap(tenant)):
                continue
            if seq.version is None or (admits(seq.version) and self.host.resident(seq.version)):
                starved.append(seq)
        for seq in starved:
            full = len(self.running) >= self.max_num_seqs
            if not full and self.blocks.blocks_for(seq.prefill_end) <= self.blocks.num_available:
                continue  # it fits as things are
            over, count = running.most_common(1)[0]
            if count <= fair_share:
                return
            victim = next(s for s in reversed(self.running) if s.tenant == over)
            self._preempt(victim, batch)
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
        self.register_full_blocks([*batch.decodes, *(s for s, _ in batch.prefills)])
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
        self.blocks.release(seq.block_table, discard=seq.finish_reason == "error")
        seq.block_table = []
