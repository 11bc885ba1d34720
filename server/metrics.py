"""Every Prometheus collector of the server, defined once, in a registry owned by the app.

The engine reports once per step (`observe`); the memory tiers and the phase controller keep plain
counters that are read at scrape time (`CountsCollector`), so nothing keeps a second copy of them.
Per-tenant and per-adapter usage (`UsageByKey`) is labelled for the busiest keys only, the rest
summed as "other", so a thousand adapters cannot blow up /metrics.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from server.adapters.host_cache import TierCounts
from server.engine.block_pool import PrefixCacheCounts
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
    preempted: int = 0  # sequences that gave their KV slot to another tenant this step


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """One request that ended, as /metrics counts it."""

    outcome: str  # stop | length | abort | error
    tenant: str
    adapter: str  # "owner/id", or BASE_MODEL_LABEL
    prompt_tokens: int
    completion_tokens: int
    latency: float  # arrival -> end
    time_per_output_token: float | None  # None with fewer than two tokens


BASE_MODEL_LABEL = "base"
OTHER_LABEL = "other"


@dataclass(slots=True)
class _Usage:
    requests: Tally[str] = field(default_factory=Tally)  # outcome -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def add(self, other: _Usage) -> None:
        self.requests.update(other.requests)
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.latency_sum += other.latency_sum


class UsageByKey(Collector):
    """Requests, tokens and latency per tenant (or per adapter). Exported for the `top_n` keys with the
    most requests, every other key summed into "other"; at most `max_tracked` keys are remembered
    (beyond that the least used is folded into "other" for good), so memory stays bounded too."""

    def __init__(self, prefix: str, label: str, top_n: int, max_tracked: int | None = None) -> None:
        self.prefix, self.label, self.top_n = prefix, label, top_n
        self.max_tracked = max_tracked or 10 * top_n
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}
        self._folded = _Usage()

    def record(self, key: str, done: FinishedRequest) -> None:
        with self._lock:
            usage = self._usage.get(key)
            if usage is None:
                if len(self._usage) >= self.max_tracked:
                    least = min(self._usage, key=lambda k: self._usage[k].total)
                    self._folded.add(self._usage.pop(least))
                usage = self._usage[key] = _Usage()
            usage.requests[done.outcome] += 1
            usage.prompt_tokens += done.prompt_tokens
            usage.completion_tokens += done.completion_tokens
            usage.latency_sum += done.latency

    def _exported(self) -> dict[str, _Usage]:
        with self._lock:
            ranked = sorted(self._usage, key=lambda k: (-self._usage[k].total, k))
            out = {k: self._usage[k] for k in ranked[: self.top_n]}
            other = _Usage()
            other.add(self._folded)
            for k in ranked[self.top_n :]:
                other.add(self._usage[k])
        if other.total:
            out[OTHER_LABEL] = other
        return out

    def collect(self) -> Iterator[CounterMetricFamily | SummaryMetricFamily]:
        usage = self._exported()
        p, label = self.prefix, self.label
        requests = CounterMetricFamily(
            f"{p}_requests", f"Finished requests by {label} and outcome", labels=[label, "outcome"]
        )
        prompt = CounterMetricFamily(f"{p}_prompt_tokens", f"Prompt tokens by {label}", labels=[label])
        generated = CounterMetricFamily(f"{p}_generation_tokens", f"Generated tokens by {label}", labels=[label])
        latency = SummaryMetricFamily(f"{p}_request_latency_seconds", f"Arrival to end by {label}", labels=[label])
        for key, u in usage.items():
            for outcome, n in sorted(u.requests.items()):
                requests.add_metric([key, outcome], n)
            prompt.add_metric([key], u.prompt_tokens)
            generated.add_metric([key], u.completion_tokens)
            latency.add_metric([key], count_value=u.total, sum_value=u.latency_sum)
        yield from (requests, prompt, generated, latency)


_TIER_COUNTERS = {
    "adapter_tier_hits": ("hits", "Adapter versions wanted and already in the tier"),
    "adapter_tier_loads": ("loads", "Adapter versions brought into the tier from the one below"),
    "adapter_tier_evictions": ("evictions", "Adapter versions pushed out of the tier to make room"),
}
_PREFIX_CACHE_COUNTERS = {
    "prefix_cache_queried_tokens": ("queried_tokens", "Prompt tokens looked up in the prefix cache"),
    "prefix_cache_hit_tokens": ("hit_tokens", "Prompt tokens found in the prefix cache (their prefill skipped)"),
}
_PHASE_COUNTERS = {
    "phase_merges": ("merges", "Adapters merged into the weights"),
    "phase_restores": ("restores", "Base weights restored"),
    "phase_merge_seconds": ("merge_seconds", "Time spent merging adapters"),
    "phase_restore_seconds": ("restore_seconds", "Time spent restoring base weights"),
}


class CountsCollector(Collector):
    """Counters read at scrape time from the objects that own them: metric name -> (field, help),
    one sample per labelled object (`label` None: a single unlabelled object)."""

    def __init__(self, fields: dict[str, tuple[str, str]], owners: dict[str, object], label: str | None) -> None:
        self.fields = fields
        self.owners = owners
        self.label = label

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (field_name, doc) in self.fields.items():
            family = CounterMetricFamily(name, doc, labels=[self.label] if self.label else [])
            for value, owner in self.owners.items():
                family.add_metric([value] if self.label else [], getattr(owner, field_name))
            yield family


class Metrics:
    def __init__(self, top_n: int = 20) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.by_tenant = UsageByKey("tenant", "tenant", top_n)
        self.by_adapter = UsageByKey("adapter", "adapter", top_n)
        r.register(self.by_tenant)
        r.register(self.by_adapter)
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
        self.preemptions = Counter(
            "preemptions", "Sequences that gave their KV slot to another tenant (resumed by recompute)", registry=r
        )
        self.queue_depth = Gauge("queue_depth", "Requests waiting for admission", registry=r)
        self.running_sequences = Gauge("running_sequences", "Sequences holding a KV slot", registry=r)
        self.kv_cache_usage = Gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.phase_merged = Gauge("phase_merged", "1 while an adapter is merged into the weights", registry=r)
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

    def watch_tiers(self, tiers: dict[str, TierCounts]) -> None:
        self.registry.register(CountsCollector(_TIER_COUNTERS, tiers, label="tier"))

    def watch_prefix_cache(self, counts: PrefixCacheCounts) -> None:
        self.registry.register(CountsCollector(_PREFIX_CACHE_COUNTERS, {"": counts}, label=None))

    def watch_phases(self, counts: PhaseCounts) -> None:
        self.registry.register(CountsCollector(_PHASE_COUNTERS, {"": counts}, label=None))

    def observe(
        self,
        step: StepReport | None,
        finished: list[FinishedRequest],
        waiting: int,
        running: int,
        kv_used_ratio: float,
        phase: str,
    ) -> None:
        """The engine's one report: a step (if one ran), requests that ended, and its gauges."""
        if step is not None:
            self.prompt_tokens.inc(step.prompt_tokens)
            self.generation_tokens.inc(step.generated_tokens)
            for seconds in step.first_token_seconds:
                self.time_to_first_token.observe(seconds)
            self.step_seconds.observe(step.seconds)
            self.preemptions.inc(step.preempted)
            self.phase_seconds.labels(step.phase).inc(step.seconds)
        for done in finished:
            self.requests.labels(done.outcome).inc()
            if done.time_per_output_token is not None:
                self.time_per_output_token.observe(done.time_per_output_token)
            self.by_tenant.record(done.tenant, done)
            self.by_adapter.record(done.adapter, done)
        self.queue_depth.set(waiting)
        self.running_sequences.set(running)
        self.kv_cache_usage.set(kv_used_ratio)
        self.phase_merged.set(0 if phase == "gathered" else 1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
