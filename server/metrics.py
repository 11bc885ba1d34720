"""Every Prometheus collector of the server, defined once, in a registry owned by the app.

The engine reports once per step (`observe`); the memory tiers keep plain counters that are read
at scrape time (`TierCollector`), so nothing on the request path touches Prometheus objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from server.adapters.host_cache import TierCounts
from server.engine.phases import PhaseCounts

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_LOAD_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(slots=True)
class StepReport:
    seconds: float
    phase: str  # "gathered" | "merged"
    prompt_tokens: int
    generated_tokens: int
    first_token_seconds: list[float] = field(default_factory=list)  # arrival -> first token, new ones


class TierCollector(Collector):
    """adapter_tier_{hits,loads,evictions}_total{tier} from the tiers' own counters."""

    def __init__(self, tiers: dict[str, TierCounts]) -> None:
        self.tiers = tiers

    def collect(self) -> Iterator[CounterMetricFamily]:
        for what, doc in (
            ("hits", "Adapter versions wanted and already in the tier"),
            ("loads", "Adapter versions brought into the tier from the one below"),
            ("evictions", "Adapter versions pushed out of the tier to make room"),
        ):
            family = CounterMetricFamily(f"adapter_tier_{what}", doc, labels=["tier"])
            for tier, counts in self.tiers.items():
                family.add_metric([tier], getattr(counts, what))
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "requests", "Finished requests by outcome (stop, length, abort, error, rejected)", ["outcome"], registry=r
        )
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.time_per_output_token = Histogram(
            "time_per_output_token_seconds",
            "Mean gap between output tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("queue_depth", "Requests waiting for admission", registry=r)
        self.running_sequences = Gauge("running_sequences", "Sequences holding a KV slot", registry=r)
        self.kv_cache_usage = Gauge("kv_cache_usage_ratio", "Fraction of KV cache slots in use", registry=r)
        self.phase_merged = Gauge("phase_merged", "1 while an adapter is merged into the weights", registry=r)
        self.merges = Counter("phase_merges", "Adapters merged into the weights", registry=r)
        self.restores = Counter("phase_restores", "Base weights restored", registry=r)
        self.merge_seconds = Counter("phase_merge_seconds", "Time spent merging adapters", registry=r)
        self.restore_seconds = Counter("phase_restore_seconds", "Time spent restoring base weights", registry=r)
        self.phase_seconds = Counter("phase_seconds", "Engine step time by phase", ["phase"], registry=r)
        self.step_seconds = Histogram(
            "engine_step_seconds", "Wall time of one engine step", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.adapter_load_seconds = Histogram(
            "adapter_load_seconds",
            "Time to bring one adapter version into "
            "a tier (host: read + parse from disk; slot: pack into a device "
            "slot)",
            ["tier"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self._phase_seen = PhaseCounts()

    def watch_tiers(self, tiers: dict[str, TierCounts]) -> None:
        self.registry.register(TierCollector(tiers))

    def observe(
        self,
        step: StepReport | None,
        finished: list[tuple[str, float | None]],
        waiting: int,
        running: int,
        kv_used_ratio: float,
        phase: str,
        phase_counts: PhaseCounts,
    ) -> None:
        """The engine's one report: a step (if one ran), requests that ended, and its gauges."""
        if step is not None:
            self.prompt_tokens.inc(step.prompt_tokens)
            self.generation_tokens.inc(step.generated_tokens)
            for seconds in step.first_token_seconds:
                self.time_to_first_token.observe(seconds)
            self.step_seconds.observe(step.seconds)
            self.phase_seconds.labels(step.phase).inc(step.seconds)
        for outcome, tpot in finished:
            self.requests.labels(outcome).inc()
            if tpot is not None:
                self.time_per_output_token.observe(tpot)
        self.queue_depth.set(waiting)
        self.running_sequences.set(running)
        self.kv_cache_usage.set(kv_used_ratio)
        self.phase_merged.set(0 if phase == "gathered" else 1)
        seen, self._phase_seen = (
            self._phase_seen,
            PhaseCounts(**{f: getattr(phase_counts, f) for f in PhaseCounts.__slots__}),
        )
        self.merges.inc(phase_counts.merges - seen.merges)
        self.restores.inc(phase_counts.restores - seen.restores)
        self.merge_seconds.inc(phase_counts.merge_seconds - seen.merge_seconds)
        self.restore_seconds.inc(phase_counts.restore_seconds - seen.restore_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
