"""When to merge an adapter into the weights and when to go back to mixing (pure Python).

A phase is either *gathered* (every request runs, adapters applied per token) or *merged(V)*
(adapter version V is written into the weights; only V's requests run, at base-model speed; all
others stay queued or paused with their KV intact). Policy, per step:

- gathered -> merged(V) when a request asked for "merged" and nobody else is owed service, or
  (mode "auto") when one adapter owns all the work and enough of it is left to pay for a merge
  (`min_merge_steps` decode steps: a merge + restore costs about that many steps of gathered
  overhead);
- merged(V) -> gathered when V has no work left but others do; at once when work of another
  adapter arrives and none of V's requests asked for "merged" (auto never holds anyone back); when
  a "gathered" request of another adapter arrives; or when any other request has been held back
  longer than `max_wait` — those requests are then *owed*: the engine stays gathered until they
  finish, so a flood of V cannot starve them and phases do not ping-pong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from server.adapters.merge import CannotMerge

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Phase:
    merged: str | None = None  # adapter version written into the weights; None = gathered

    def admits(self, version: str | None) -> bool:
        return self.merged is None or version == self.merged

    @property
    def name(self) -> str:
        return "gathered" if self.merged is None else "merged"


GATHERED = Phase()


class Work(Protocol):
    """What the policy needs to know of a queued or running sequence."""

    @property
    def request_id(self) -> str: ...
    @property
    def version(self) -> str | None: ...
    @property
    def mode(self) -> str: ...  # "auto" | "gathered" | "merged"
    @property
    def remaining_tokens(self) -> int: ...


class PhasePolicy:
    def __init__(self, max_wait_s: float, min_merge_steps: int = 48) -> None:
        self.max_wait_s = max_wait_s
        self.min_merge_steps = min_merge_steps
        self._held_since: dict[str, float] = {}  # request -> when the current phase started holding it
        self._owed: set[str] = set()
        self.unmergeable: set[str] = set()  # versions whose merge failed: always gathered

    def next_phase(self, current: Phase, work: list[Work], now: float) -> Phase:
        live = {w.request_id for w in work}
        self._owed &= live
        for rid in list(self._held_since):
            if rid not in live:
                del self._held_since[rid]
        for w in work:
            if current.admits(w.version):
                self._held_since.pop(w.request_id, None)
            else:
                self._held_since.setdefault(w.request_id, now)
        if current.merged is not None:
            return self._from_merged(current, work, now)
        return self._from_gathered(work)

    def _from_merged(self, current: Phase, work: list[Work], now: float) -> Phase:
        starved = {rid for rid, since in self._held_since.items() if now - since >= self.max_wait_s}
        if starved:
            self._owed |= starved
            return GATHERED
        if work and not any(w.version == current.merged for w in work):
            return GATHERED
        held = [w for w in work if not current.admits(w.version)]
        if any(w.mode == "gathered" for w in held):
            return GATHERED  # "gathered" requests are never held back by a merge
        if held and not any(w.mode == "merged" for w in work if w.version == current.merged):
            return GATHERED  # an auto merge yields as soon as anyone else wants to run
        return current

    def _from_gathered(self, work: list[Work]) -> Phase:
        if not work or self._owed:
            return GATHERED
        versions = {w.version for w in work}
        if len(versions) == 1:
            (version,) = versions
            if (
                version is not None
                and version not in self.unmergeable
                and all(w.mode != "gathered" for w in work)
                and max(w.remaining_tokens for w in work) >= self.min_merge_steps
            ):
                return Phase(version)
        wanted = [
            w.version
            for w in work
            if w.mode == "merged" and w.version is not None and w.version not in self.unmergeable
        ]
        return Phase(wanted[0]) if wanted else GATHERED


class WeightsSwitch(Protocol):
    """What the controller drives: the adapter manager's merge / restore."""

    @property
    def merged_version(self) -> str | None: ...
    def merge(self, version: str) -> float: ...
    def restore(self) -> float: ...


@dataclass(slots=True)
class PhaseCounts:
    merges: int = 0
    restores: int = 0
    merge_seconds: float = 0.0
    restore_seconds: float = 0.0


class PhaseController:
    """Owns the engine's phase: asks the policy for the next one and switches the weights between
    steps (only weights change, so every sequence's KV stays valid)."""

    def __init__(self, policy: PhasePolicy, weights: WeightsSwitch) -> None:
        self.policy = policy
        self.weights = weights
        self.current = GATHERED
        self.counts = PhaseCounts()

    def advance(self, work: list[Work], now: float) -> Phase:
        self.enter(self.policy.next_phase(self.current, work, now))
        return self.current

    def enter(self, phase: Phase) -> None:
        if phase == self.current:
            return
        if self.weights.merged_version is not None:
            self.counts.restore_seconds += self.weights.restore()
            self.counts.restores += 1
        if phase.merged is not None:
            try:
                self.counts.merge_seconds += self.weights.merge(phase.merged)
                self.counts.merges += 1
            except CannotMerge as exc:
                log.warning("serving %s gathered: %s", phase.merged, exc)
                self.policy.unmergeable.add(phase.merged)
                phase = GATHERED
        self.current = phase
        log.debug("phase: %s", phase.name)
