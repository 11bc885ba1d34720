"""The engine thread: the only owner of scheduler, KV cache, sampler and phase state.

HTTP handlers talk to it through `submit` / `abort` (a thread-safe inbox); it answers through each
request's `emit` callback. One loop: drain the inbox, then `step`:

    phase   = phases.advance(...)            # merge / restore between steps when the policy says so
    batch   = scheduler.schedule(phase)      # who runs this step
    logits  = runner.run(batch)              # one forward pass for everyone
    tokens, logprobs = sampler.sample(...)   # per-request, seeded; None for a row that broke
    done    = scheduler.postprocess(...)     # advance, append, release
    publish / finish, then observe (metrics)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from server.cpu_threads import CpuTurns
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.phases import GATHERED, PhaseController
from server.engine.request import GenerationError, Request, TokenEvent
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import Sequence
from server.metrics import BASE_MODEL_LABEL, FinishedRequest, Metrics, StepReport
from server.model.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

BACKGROUND_SHARE = 0.2
"""Background sections may run for up to this share of the last step's time before the next step:
a step boundary then costs at most ~1.2x a step (plus one section), and a burst of cold loads
proceeds several per boundary instead of one."""

NON_FINITE_OUTPUT = GenerationError(
    "non_finite_output",
    "the model's output for this request became non-finite (NaN or Inf), or overflowed at its "
    "temperature: its adapter produces values out of range; no other request was affected",
)


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What /health reports, asked of the engine instead of reached for through its parts."""

    alive: bool
    phase: str
    running: int
    waiting: int
    kv_blocks: int
    kv_blocks_used: int
    kernel_backend: str


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: TextTokenizer,
        metrics: Metrics,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        phases: PhaseController,
        turns: CpuTurns | None = None,
    ) -> None:
        self.runner = runner
        self.turns = turns or CpuTurns()
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.phases = phases
        self._finished: list[FinishedRequest] = []  # since the last observe
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

    def status(self) -> EngineStatus:
        """A snapshot for /health (plain reads of engine-thread state; good enough for a report)."""
        blocks = self.scheduler.blocks
        return EngineStatus(
            alive=self.alive,
            phase=self.phases.current.name,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks=blocks.num_blocks - 1,
            kv_blocks_used=blocks.num_used,
            kernel_backend=self.runner.adapters.backend,
        )

    # ---- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        idle, last_step_s = False, 0.0
        while not self._stopping:
            has_work = self.scheduler.has_work()
            # Work that cannot run yet (held by a merged phase, or waiting for the adapter loader)
            # re-checks every 2 ms.
            self._drain_inbox(block=not has_work, timeout=0.002 if idle and has_work else None)
            if self.scheduler.has_work() and not self._stopping:
                # Background CPU work (adapter parsing, uploads) runs between steps, never during one.
                with self.turns.engine_step(budget_s=BACKGROUND_SHARE * last_step_s):
                    started = time.perf_counter()
                    idle = not self.step()
                last_step_s = time.perf_counter() - started

    def _drain_inbox(self, block: bool, timeout: float | None = None) -> None:
        try:
            item = self._inbox.get(block=block or timeout is not None, timeout=timeout)
            while True:
                self._handle(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self.observe()

    def _handle(self, item: Request | _Abort | None) -> None:
        if isinstance(item, _Abort):
            seq = self.scheduler.abort(item.request_id)
            if seq is not None:
                self._finish(seq, time.perf_counter())
        elif item is not None:
            self.admit(item)

    def admit(self, request: Request) -> None:
        """Queue a request for scheduling. Engine thread only (or tests driving `step` by hand)."""
        detok = IncrementalDetokenizer(self.tokenizer, request.params.stop)
        self.scheduler.add(Sequence(request, list(request.prompt_ids), detok, self.eos_token_ids, self.max_model_len))

    def step(self) -> bool:
        """One engine step; False when nothing could run (all work held back or still loading)."""
        started = time.perf_counter()
        phase = self.phases.advance(self.scheduler.unfinished(), started)
        batch = self.scheduler.schedule(phase.admits)
        for seq in batch.failed:
            self._finish(seq, started)
        if batch.empty:
            return bool(batch.failed)
        sampled = batch.sampled()
        try:
            self.runner.zero_blocks(self.scheduler.blocks.take_to_zero())
            logits = self.runner.run(batch)
            tokens, logprobs = self.sampler.sample(logits, [(s.request_id, s.request.params) for s in sampled])
        except Exception as exc:  # a failing step must not take the server down with it
            log.exception("engine step failed")
            self._fail(batch, f"internal error during generation: {exc}")
            return True
        for seq, token, logprob in zip(sampled, tokens, logprobs):
            if token is None:  # this request's numbers broke; the rest of the batch is sampled as usual
                seq.error = NON_FINITE_OUTPUT
                log.warning("request %s (adapter version %s) ended: non-finite logits", seq.request_id, seq.version)
            elif logprob is not None:
                seq.pending_logprobs.append(logprob)
        finished = self.scheduler.postprocess(batch, tokens)
        now = time.perf_counter()
        first_tokens = []
        for seq in sampled:
            if seq.first_token_time is None:
                seq.first_token_time = now
                first_tokens.append(now - seq.request.arrival_time)
            if seq.finish_reason is None:
                self._publish(seq)
        for seq in finished:
            self._finish(seq, now)
        self.observe(
            StepReport(
                seconds=time.perf_counter() - started,
                phase=phase.name,
                prompt_tokens=sum(n for _, n in batch.prefills),
                generated_tokens=sum(t is not None for t in tokens),
                first_token_seconds=first_tokens,
                preempted=len(batch.preempted),
            )
        )
        return True

    def restore_base(self) -> None:
        """Leave any merged phase now (engine thread, or tests using the model directly)."""
        self.phases.enter(GATHERED)

    def _publish(self, seq: Sequence) -> None:
        new_ids = seq.token_ids[seq.num_prompt + seq.emitted_tokens :]
        seq.emitted_tokens += len(new_ids)
        delta = seq.detokenizer.take_delta(final=False)
        seq.request.emit(TokenEvent(seq.request_id, new_ids, delta, logprobs=seq.take_logprobs()))

    def _finish(self, seq: Sequence, now: float) -> None:
        """Every request ends here exactly once: drop its sampler state and its adapter hold, emit
        the final event."""
        new_ids = seq.token_ids[seq.num_prompt + seq.emitted_tokens :]
        seq.emitted_tokens += len(new_ids)
        self.sampler.forget(seq.request_id)
        self.runner.adapters.finished(seq.version)
        if seq.request.on_finish is not None:
            seq.request.on_finish()
        tpot = None
        if seq.first_token_time is not None and seq.num_generated > 1:
            tpot = (now - seq.first_token_time) / (seq.num_generated - 1)
        request = seq.request
        self._finished.append(
            FinishedRequest(
                outcome=seq.finish_reason,
                tenant=request.tenant,
                adapter=request.adapter_name or BASE_MODEL_LABEL,
                prompt_tokens=seq.num_prompt,
                completion_tokens=seq.num_generated,
                latency=now - request.arrival_time,
                time_per_output_token=tpot,
            )
        )
        seq.request.emit(
            TokenEvent(
                seq.request_id,
                new_ids,
                seq.detokenizer.take_delta(final=True),
                finish_reason=seq.finish_reason,
                prompt_tokens=seq.num_prompt,
                completion_tokens=seq.num_generated,
                error=seq.error,
                logprobs=seq.take_logprobs(),
            )
        )

    def _fail(self, batch: ScheduledBatch, message: str) -> None:
        for seq in batch.decodes + [s for s, _ in batch.prefills]:
            self.scheduler.abort(seq.request_id)
            seq.finish_reason = "error"
            seq.error = GenerationError("internal_error", message)
            self._finish(seq, time.perf_counter())

    def observe(self, step: StepReport | None = None) -> None:
        """Everything /metrics learns from the engine, in one call per step (and after the inbox)."""
        finished, self._finished = self._finished, []
        blocks = self.scheduler.blocks
        self.metrics.observe(
            step=step,
            finished=finished,
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_used_ratio=blocks.num_used / (blocks.num_blocks - 1),
            phase=self.phases.current.name,
        )
