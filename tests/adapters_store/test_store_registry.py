"""AdapterRegistry / AdapterInfo basics."""

from __future__ import annotations

import threading
from dataclasses import replace

import torch

from adapters_store import DEFAULT_TENANT, AdapterInfo, AdapterRef, AdapterRegistry, LayerFactors, ParsedAdapter


def _parsed() -> ParsedAdapter:
    def lf(r, out=8, inp=4):
        return LayerFactors(A=torch.zeros(r, inp), B=torch.zeros(out, r))

    layers = {"m.l0.q_proj": lf(2), "m.l0.k_proj": lf(4), "m.l1.q_proj": lf(4)}
    return ParsedAdapter(kind="adalora", layers=layers, target_modules=["k_proj", "q_proj"])


def test_info_from_parsed():
    info = AdapterInfo.from_parsed("x", "0123456789abcdef", _parsed(), created_at=12.5)
    assert info.rank == 4 and info.num_layers == 3 and info.kind == "adalora"
    assert info.rank_counts == {2: 1, 4: 2}
    assert info.bytes == 4 * (2 * 4 + 8 * 2 + 4 * 4 + 8 * 4 + 4 * 4 + 8 * 4)
    assert info.target_modules == ["k_proj", "q_proj"] and info.created_at == 12.5
    assert AdapterInfo.from_dict(info.to_dict()) == info


def test_register_resolve_remove_list():
    reg = AdapterRegistry()
    a1 = AdapterInfo.from_parsed("a", "1" * 16, _parsed())
    a2 = AdapterInfo.from_parsed("a", "2" * 16, _parsed())
    b = AdapterInfo.from_parsed("b", "3" * 16, _parsed())
    a = AdapterRef(DEFAULT_TENANT, "a")
    assert reg.resolve(a) is None
    assert reg.register(b) is None
    assert reg.register(a1) is None
    assert reg.register(a2) == a1  # previous version handed back for retirement
    assert reg.resolve(a) == a2
    assert [i.adapter_id for i in reg.list()] == ["a", "b"]
    assert a in reg and len(reg) == 2
    assert reg.remove(a) == a2 and reg.remove(a) is None
    assert reg.resolve(a) is None and [i.adapter_id for i in reg.list()] == ["b"]


def test_ids_are_per_tenant():
    reg = AdapterRegistry()
    mine = replace(AdapterInfo.from_parsed("my-lora", "1" * 16, _parsed()), tenant="acme")
    theirs = replace(AdapterInfo.from_parsed("my-lora", "2" * 16, _parsed()), tenant="globex")
    assert reg.register(mine) is None and reg.register(theirs) is None  # same id, two owners
    assert reg.resolve(AdapterRef("acme", "my-lora")) == mine
    assert reg.resolve(AdapterRef("globex", "my-lora")) == theirs
    assert reg.list("acme") == [mine] and len(reg) == 2
    assert reg.usage("acme") == (1, mine.bytes) and reg.usage("initech") == (0, 0)


def test_concurrent_register():
    reg = AdapterRegistry()
    infos = [AdapterInfo.from_parsed(f"id{i}", "0" * 16, _parsed()) for i in range(200)]
    threads = [threading.Thread(target=lambda chunk=infos[k::4]: [reg.register(i) for i in chunk]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reg.list()) == 200
