"""Every Prometheus collector of the server, defined once, in a registry owned by the app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("requests", "Finished requests by outcome "
                                "(stop, length, abort, error, rejected)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram("time_to_first_token_seconds", "Arrival to first token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("time_per_output_token_seconds",
                                               "Mean gap between output tokens of a request",
                                               buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("queue_depth", "Requests waiting for admission", registry=r)
        self.running_sequences = Gauge("running_sequences", "Sequences holding a KV slot", registry=r)
        self.kv_cache_usage = Gauge("kv_cache_usage_ratio", "Fraction of KV cache slots in use", registry=r)
        self.adapter_mode = Gauge("adapter_mode_merged", "1 while an adapter is merged into the weights",
                                  registry=r)
        self.merges = Counter("adapter_merges", "Adapters merged into the weights", registry=r)
        self.restores = Counter("adapter_restores", "Base weights restored", registry=r)
        self.merge_seconds = Counter("adapter_merge_seconds", "Time spent merging adapters", registry=r)
        self.restore_seconds = Counter("adapter_restore_seconds", "Time spent restoring base weights", registry=r)
        self.mode_seconds = Counter("mode_seconds", "Engine step time by phase", ["mode"], registry=r)
        self.step_seconds = Histogram("engine_step_seconds", "Wall time of one engine step",
                                      buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
