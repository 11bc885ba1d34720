"""The engine thread: the only owner of scheduler, KV cache and sampler state.

HTTP handlers talk to it through `submit` / `abort` (a thread-safe inbox); it answers through each
request's `emit` callback. One loop: drain the inbox, schedule, run, sample, publish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from server.adapters.merge import CannotMerge
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.phases import GATHERED, Phase, PhasePolicy
from server.engine.request import GenerationError, Request, TokenEvent
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import Sequence
from server.metrics import Metrics
from server.model.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


NON_FINITE_OUTPUT = GenerationError(
    "non_finite_output", "the model's output for this request became non-finite (NaN or Inf), or overflowed at its "
    "temperature: its adapter produces values out of range; no other request was affected")


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: TextTokenizer,
                 metrics: Metrics, max_model_len: int, eos_token_ids: frozenset[int],
                 policy: PhasePolicy | None = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.policy = policy or PhasePolicy(max_wait_s=0.5)
        self.phase = GATHERED
        self._inbox: queue.Queue[Request | _Abort | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        self._inbox.put(request)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    # ---- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        idle = False
        while not self._stopping:
            has_work = self.scheduler.has_work()
            # Held-back work (a merged phase of another adapter) re-checks the policy every 2 ms.
            self._drain_inbox(block=not has_work, timeout=0.002 if idle and has_work else None)
            if self.scheduler.has_work() and not self._stopping:
                idle = not self.step()

    def _drain_inbox(self, block: bool, timeout: float | None = None) -> None:
        try:
            item = self._inbox.get(block=block or timeout is not None, timeout=timeout)
            while True:
                self._handle(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._update_gauges()

    def _handle(self, item: Request | _Abort | None) -> None:
        if item is None:
            return
        if isinstance(item, _Abort):
            seq = self.scheduler.abort(item.request_id)
            if seq is not None:
                self._finish(seq, time.perf_counter())
            return
        self.admit(item)

    def admit(self, request: Request) -> None:
        """Queue a request for scheduling. Engine thread only (or tests driving `step` by hand)."""
        detok = IncrementalDetokenizer(self.tokenizer, request.params.stop)
        self.scheduler.add(Sequence(request, list(request.prompt_ids), detok, self.eos_token_ids,
                                    self.max_model_len))

    def step(self) -> bool:
        """One engine step; False when nothing could run (e.g. all work is held by a merged phase)."""
        started = time.perf_counter()
        self._enter(self.policy.next_phase(self.phase, self.scheduler.unfinished(), started))
        batch = self.scheduler.schedule(self.phase.admits)
        if batch.empty:
            return False
        sampled = batch.sampled()
        try:
            self.runner.wipe_kv(self.scheduler.take_released_kv())
            logits = self.runner.run(batch)
            tokens = self.sampler.sample(logits, [(s.request_id, s.request.params) for s in sampled])
        except Exception as exc:  # a failing step must not take the server down with it
            log.exception("engine step failed")
            self._fail(batch, f"internal error during generation: {exc}")
            return True
        for seq, token in zip(sampled, tokens):
            if token is None:  # this request's numbers broke; the rest of the batch is sampled as usual
                seq.error = NON_FINITE_OUTPUT
                log.warning("request %s (adapter version %s) ended: non-finite logits", seq.request_id, seq.version)
        finished = self.scheduler.postprocess(batch, tokens)
        now = time.perf_counter()
        self.metrics.prompt_tokens.inc(sum(n for _, n in batch.prefills))
        self.metrics.generation_tokens.inc(len(sampled))
        for seq in sampled:
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.metrics.time_to_first_token.observe(now - seq.request.arrival_time)
            if seq.finish_reason is None:
                self._publish(seq)
        for seq in finished:
            self._finish(seq, now)
        self._update_gauges()
        elapsed = time.perf_counter() - started
        self.metrics.step_seconds.observe(elapsed)
        self.metrics.mode_seconds.labels("gathered" if self.phase.merged is None else "merged").inc(elapsed)
        return True

    def restore_base(self) -> None:
        """Leave any merged phase now (engine thread, or tests using the model directly)."""
        self._enter(GATHERED)

    def _enter(self, phase: Phase) -> None:
        """Switch phases between steps: only weights change, so every sequence's KV stays valid."""
        if phase == self.phase:
            return
        adapters = self.runner.adapters
        if adapters.merged_version is not None:
            self.metrics.restore_seconds.inc(adapters.restore())
            self.metrics.restores.inc()
        if phase.merged is not None:
            try:
                self.metrics.merge_seconds.inc(adapters.merge(phase.merged))
                self.metrics.merges.inc()
            except CannotMerge as exc:
                log.warning("serving %s gathered: %s", phase.merged, exc)
                self.policy.unmergeable.add(phase.merged)
                phase = GATHERED
        self.phase = phase
        self.metrics.adapter_mode.set(0 if phase.merged is None else 1)
        log.debug("phase: %s", "gathered" if phase.merged is None else f"merged {phase.merged}")

    def _publish(self, seq: Sequence) -> None:
        new_ids = seq.token_ids[seq.num_prompt + seq.emitted_tokens:]
        seq.emitted_tokens += len(new_ids)
        seq.request.emit(TokenEvent(seq.request_id, new_ids, seq.detokenizer.take_delta(final=False)))

    def _finish(self, seq: Sequence, now: float) -> None:
        new_ids = seq.token_ids[seq.num_prompt + seq.emitted_tokens:]
        seq.emitted_tokens += len(new_ids)
        self.sampler.forget(seq.request_id)
        self.runner.adapters.finished(seq.request.adapter_version)
        self.metrics.requests.labels(seq.finish_reason).inc()
        if seq.first_token_time is not None and seq.num_generated > 1:
            self.metrics.time_per_output_token.observe((now - seq.first_token_time) / (seq.num_generated - 1))
        seq.request.emit(TokenEvent(seq.request_id, new_ids, seq.detokenizer.take_delta(final=True),
                                    finish_reason=seq.finish_reason, prompt_tokens=seq.num_prompt,
                                    completion_tokens=seq.num_generated, error=seq.error))
        self._update_gauges()

    def _fail(self, batch: ScheduledBatch, message: str) -> None:
        for seq in batch.decodes + [s for s, _ in batch.prefills]:
            self.scheduler.abort(seq.request_id)
            seq.finish_reason = "error"
            self.sampler.forget(seq.request_id)
            self.runner.adapters.finished(seq.request.adapter_version)
            self.metrics.requests.labels("error").inc()
            seq.request.emit(TokenEvent(seq.request_id, [], "", finish_reason="error",
                                        error=GenerationError("internal_error", message),
                                        prompt_tokens=seq.num_prompt, completion_tokens=seq.num_generated))
        self._update_gauges()

    def _update_gauges(self) -> None:
        slots = self.scheduler.slots
        self.metrics.queue_depth.set(len(self.scheduler.waiting))
        self.metrics.running_sequences.set(len(self.scheduler.running))
        self.metrics.kv_cache_usage.set(slots.num_used / slots.num_slots)
