"""Tenancy pieces without a server: the request gate, per-tenant limits files, and usage metrics whose
label set stays bounded however many tenants and adapters there are."""

from __future__ import annotations

import json

import pytest

from server.errors import LimitExceeded
from server.metrics import FinishedRequest, Metrics
from server.tenancy.keys import KeyFileError, KeyRing, add_key
from server.tenancy.limits import RequestGate, TenantLimits, TenantPolicy


def test_gate_counts_running_plus_queued_per_tenant_and_server_wide():
    policy = TenantPolicy(TenantLimits(max_running=2, max_queued=1), {"big": TenantLimits(max_queued=10)})
    gate = RequestGate(policy, engine_capacity=4, max_queued=3)
    gate.enter("a", 3)
    with pytest.raises(LimitExceeded) as refused:
        gate.enter("a")
    assert refused.value.limit == "max_queued" and refused.value.headers == {"Retry-After": "1"}
    gate.enter("big", 4)  # big runs up to the engine's 4 (max_running 0 = no cap) + 10 queued
    with pytest.raises(LimitExceeded) as full:
        gate.enter("big")  # 7 in flight = 4 running + 3 queued server-wide
    assert full.value.limit == "server_max_queued"
    gate.leave("a", 3)
    assert gate.in_flight("a") == 0 and gate.in_flight() == 4
    gate.enter("a")
    with pytest.raises(RuntimeError):
        gate.leave("nobody")


def test_n_choices_are_admitted_all_or_none():
    gate = RequestGate(TenantPolicy(TenantLimits(max_running=1, max_queued=1)), engine_capacity=8, max_queued=8)
    with pytest.raises(LimitExceeded):
        gate.enter("a", 3)
    assert gate.in_flight("a") == 0


def test_limits_file_overrides_some_fields_and_refuses_unknown_ones(tmp_path):
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({"acme": {"max_running": 3}}))
    policy = TenantPolicy.load(path, TenantLimits(max_queued=7))
    assert policy.limits("acme") == TenantLimits(max_running=3, max_queued=7)
    assert policy.limits("other") == TenantLimits(max_queued=7)
    for bad in ({"acme": {"max_runing": 3}}, {"acme": {"max_running": -1}}, {"../x": {}}, []):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            TenantPolicy.load(path, TenantLimits())


def test_key_ring_refuses_files_it_cannot_trust(tmp_path):
    path = tmp_path / "keys.json"
    for bad in ({"notahexdigest": {"tenant": "a"}}, {"a" * 64: {"tenant": "a", "role": "root"}}, {"a" * 64: {}}):
        path.write_text(json.dumps(bad))
        with pytest.raises(KeyFileError):
            KeyRing.load(path)
        with pytest.raises(KeyFileError):
            add_key(path, "acme")  # never extends a file the server would refuse
    path.unlink()
    keys = [add_key(path, "acme"), add_key(path, "acme", "admin")]
    ring = KeyRing.load(path)
    assert [ring.authenticate(k).role for k in keys] == ["user", "admin"] and len(set(keys)) == 2


def _done(tenant: str, adapter: str) -> FinishedRequest:
    return FinishedRequest("stop", tenant, adapter, 3, 5, 0.5, 0.01)


def test_usage_metrics_label_the_busiest_and_sum_the_rest_as_other():
    metrics = Metrics(top_n=2)
    for tenant, n in {"big": 5, "mid": 3, "small": 1, "tiny": 1}.items():
        metrics.observe(None, [_done(tenant, f"{tenant}/a")] * n, 0, 0, 0.0, "gathered")
    text = metrics.render().decode()
    assert 'tenant_requests_total{outcome="stop",tenant="big"} 5.0' in text
    assert 'tenant_requests_total{outcome="stop",tenant="mid"} 3.0' in text
    assert 'tenant_requests_total{outcome="stop",tenant="other"} 2.0' in text
    assert 'tenant="small"' not in text and 'tenant_generation_tokens_total{tenant="other"} 10.0' in text


def test_usage_metrics_memory_is_bounded_too():
    metrics = Metrics(top_n=2)  # remembers 20 keys at most
    for i in range(1000):
        metrics.observe(None, [_done("t", f"t/adapter-{i}")], 0, 0, 0.0, "gathered")
    assert len(metrics.by_adapter._usage) <= 20
    text = metrics.render().decode()
    assert text.count("adapter_requests_total{") == 3  # two labelled + other
    assert 'adapter_requests_total{adapter="other",outcome="stop"} 998.0' in text
