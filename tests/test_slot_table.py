"""Adapter slot table and host cache: pinning, LRU eviction, waiting (pure Python)."""

from __future__ import annotations

import pytest

from adapters_store import ParsedAdapter
from server.adapters.host_cache import HostCache
from server.adapters.slot_table import SlotTable


def test_acquire_assigns_slots_and_reports_loads_once():
    table = SlotTable(2)
    assert table.acquire("v1") == 0
    assert table.acquire("v1") == 0          # already resident: no second load
    assert table.acquire("v2") == 1
    assert table.take_loads() == [("v1", 0), ("v2", 1)]
    assert table.take_loads() == []


def test_all_pinned_means_wait():
    table = SlotTable(1)
    table.acquire("v1")
    assert table.acquire("v2") is None
    assert not table.can_acquire("v2")
    table.release("v1")
    assert table.acquire("v2") == 0          # v1 evicted once unpinned
    assert table.slot_of("v1") is None


def test_eviction_is_least_recently_used():
    table = SlotTable(2)
    for v in ("a", "b"):
        table.acquire(v)
        table.release(v)
    table.acquire("a")
    table.release("a")                       # a is now the most recently used
    assert table.acquire("c") == table.resident["c"]
    assert "b" not in table.resident and "a" in table.resident


def test_pinned_version_is_never_evicted():
    table = SlotTable(2)
    table.acquire("a")                       # pinned twice
    table.acquire("a")
    table.acquire("b")
    table.release("b")
    table.release("a")                       # still pinned once
    table.acquire("c")
    assert "a" in table.resident and "b" not in table.resident


def _parsed(nbytes: int) -> ParsedAdapter:
    import torch
    from adapters_store import LayerFactors
    a = torch.zeros(nbytes // 8, 1)
    return ParsedAdapter("lora", {"m": LayerFactors(A=a.T.contiguous(), B=a.clone())}, ["m"])


def test_host_cache_keeps_retained_entries_and_evicts_others():
    cache = HostCache(max_bytes=1000)
    cache.put("old", _parsed(800))
    loads = []
    cache.retain("held", lambda: loads.append(1) or _parsed(800))
    assert loads == [1] and "held" in cache
    assert "old" not in cache                # over budget: the unretained one goes
    cache.put("other", _parsed(800))
    assert "held" in cache                   # retained: survives even over budget
    cache.release("held")
    cache.put("newest", _parsed(800))
    assert "held" not in cache
    with pytest.raises(KeyError):
        cache.get("held")
