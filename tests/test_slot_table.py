"""The device tier (slot table) and the host tier (host cache): LRU eviction, versions in use,
holds, loads and their counters (pure Python)."""

from __future__ import annotations

import pytest

from adapters_store import ParsedAdapter
from server.adapters.host_cache import HostCache
from server.adapters.slot_table import SlotTable


def test_acquire_assigns_slots_and_reports_loads_once():
    table = SlotTable(2)
    assert table.acquire("v1") == 0
    assert table.acquire("v1") == 0  # already resident: no second load
    assert table.acquire("v2") == 1
    assert table.take_loads() == [("v1", 0), ("v2", 1)]
    assert table.take_loads() == []
    assert (table.counts.hits, table.counts.loads, table.counts.evictions) == (1, 2, 0)


def test_all_in_use_means_wait():
    table = SlotTable(1)
    table.acquire("v1")
    assert table.acquire("v2", in_use={"v1"}) is None
    assert table.acquire("v2", in_use=set()) == 0  # v1 evicted once nothing running uses it
    assert table.slot_of("v1") is None and table.counts.evictions == 1


def test_eviction_is_least_recently_used_among_versions_not_in_use():
    table = SlotTable(3)
    for v in ("a", "b", "c"):
        table.acquire(v)
    table.acquire("a")  # a is now the most recently used; b the least
    assert table.acquire("d", in_use={"b"}) == table.resident["d"]
    assert "c" not in table.resident and {"a", "b"} <= set(table.resident)


def _parsed(nbytes: int) -> ParsedAdapter:
    import torch

    from adapters_store import LayerFactors

    a = torch.zeros(nbytes // 8, 1)
    return ParsedAdapter("lora", {"m": LayerFactors(A=a.T.contiguous(), B=a.clone())}, ["m"])


def test_host_cache_keeps_held_entries_and_evicts_others():
    cache = HostCache(max_bytes=1000)
    cache.put("old", _parsed(800))
    assert cache.hold("held") is False  # not in memory: the caller asks the loader
    assert not cache.resident("held")
    cache.fill("held", _parsed(800))
    assert cache.resident("held") and "old" not in cache  # over budget: the unheld one goes
    cache.put("other", _parsed(800))
    assert "held" in cache  # held: survives even over budget
    cache.release("held")
    cache.put("newest", _parsed(800))
    assert "held" not in cache
    with pytest.raises(KeyError):
        cache.get("held")
    assert (cache.counts.loads, cache.counts.evictions) == (1, 3)


def test_fill_of_a_version_nobody_holds_any_more_is_dropped():
    cache = HostCache(max_bytes=10_000)
    cache.hold("v")
    cache.release("v")  # the request was aborted before the load finished
    cache.fill("v", _parsed(800))
    assert "v" not in cache and cache.nbytes == 0


def test_failed_load_is_reported_until_the_last_hold_ends():
    cache = HostCache(max_bytes=10_000)
    cache.hold("v")
    cache.hold("v")
    cache.fail("v", "corrupted")
    assert cache.load_error("v") == "corrupted"
    cache.release("v")
    assert cache.load_error("v") == "corrupted"
    cache.release("v")
    assert cache.load_error("v") is None  # a later request tries again


def test_hold_of_a_resident_version_counts_a_hit():
    cache = HostCache(max_bytes=10_000)
    cache.put("v", _parsed(800))
    assert cache.hold("v") is True and cache.counts.hits == 1
