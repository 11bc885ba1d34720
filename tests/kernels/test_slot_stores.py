"""One slot store per adapter kind (server/adapters/kinds), and the step plan they build (torch backend).

The numbers are checked elsewhere (PEFT oracles, Triton equal to torch); here: the registry covers every
kind the parsers produce, a slot moves between stores cleanly (a projection family's bases leave with
its last adapter), each store keeps only what its kernels read, and the plan is self-contained (kernels/
never imports server/).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kernels.batch import LoraRows, RandLoraRows, StepPlan, TokenGroup, VeraRows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama and one parsed PEFT adapter of every kind."""
    from peft import AdaLoraConfig, LoraConfig, RandLoraConfig, VeraConfig
    from transformers import LlamaForCausalLM

    from adapters_store import parse_adapter
    from server.adapters.frozen_base import FrozenBase
    from server.adapters.packing import base_model_spec
    from server.model.loader import load_model
    from tests.conftest import build_tiny_llama
    from tests.peft_helpers import ALL_TARGETS, save_peft_adapter

    work = tmp_path_factory.mktemp("stores")
    model_dir = build_tiny_llama(work / "base", seed=5, attention_bias=True)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = load_model(model_dir, torch.float32, 64)
    spec = base_model_spec(model.adapted_linears(), FrozenBase.capture(model.adapted_linears()), 64, 2**30)
    configs = {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj"]),
        "dora": LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["o_proj"]),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]),
        "vera": VeraConfig(r=6, target_modules=ALL_TARGETS, projection_prng_key=1),
        "vera-same-family": VeraConfig(r=6, target_modules=["q_proj", "up_proj", "down_proj"], projection_prng_key=1),
        "randlora": RandLoraConfig(r=4, target_modules=["q_proj", "down_proj"], projection_prng_key=2),
    }
    parsed = {
        name: parse_adapter(*save_peft_adapter(hf, cfg, work / name, seed=i, scale=0.2), spec)
        for i, (name, cfg) in enumerate(configs.items())
    }
    return model, parsed


class _Table:
    """What the manager reads of the slot table, with the slots chosen by the test."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}
        self._loads: list[tuple[str, int]] = []

    def put(self, version: str, slot: int) -> None:
        self._slot_of = {v: s for v, s in self._slot_of.items() if s != slot} | {version: slot}
        self._loads.append((version, slot))

    def slot_of(self, version: str) -> int | None:
        return self._slot_of.get(version)

    def take_loads(self) -> list[tuple[str, int]]:
        loads, self._loads = self._loads, []
        return loads


def _manager(model, parsed: dict, num_slots: int):
    from server.adapters.frozen_base import FrozenBase
    from server.adapters.host_cache import HostCache
    from server.adapters.manager import AdapterManager

    cache = HostCache(max_bytes=2**40)
    for name, p in parsed.items():
        cache.put(name, p)
    linears = model.adapted_linears()
    return AdapterManager(_Table(num_slots), cache, linears, FrozenBase.capture(linears), torch.float32)


def _load(manager, **slots: int) -> None:
    for name, slot in slots.items():
        manager.table.put(name.replace("_", "-"), slot)
    manager.load_pending()


def test_every_kind_the_parsers_produce_has_a_store(tiny):
    from server.adapters.kinds import SLOT_STORES
    from server.adapters.kinds.lora import LoraFamilyStore

    _, parsed = tiny
    kinds = {p.kind for p in parsed.values()}
    assert kinds == {"lora", "rslora", "dora", "adalora", "vera", "randlora"}
    assert kinds <= set(SLOT_STORES)
    assert {SLOT_STORES[k] for k in ("lora", "rslora", "dora", "adalora")} == {LoraFamilyStore}


def test_a_slot_moves_between_stores_and_projection_families_leave_with_their_last_adapter(tiny):
    model, parsed = tiny
    manager = _manager(model, parsed, num_slots=2)
    lora, vera, randlora = (manager.store_for(k) for k in ("lora", "vera", "randlora"))
    _load(manager, vera=0, vera_same_family=1)
    key = parsed["vera"].family.key()
    assert parsed["vera-same-family"].family.key() == key
    assert list(vera.bases) == [key] and vera.bases[key].slots == {0, 1} and vera.generated == 1
    assert manager.order_key(0) == (key, 0) and manager.order_key(-1) == ("", -1)

    _load(manager, lora=0)  # slot 0 leaves the projection family, which stays resident
    assert list(vera.bases) == [key] and vera.bases[key].slots == {1} and vera.generated == 1
    assert lora.slot_factors[0] is not None and lora.slot_factors[1] is None and vera.family_of == [None, key]
    assert manager.order_key(0) == ("", 0) and manager.order_key(1) == (key, 1)
    stacks = {k: layer.stack for k, layer in vera.layers[key].items()}
    adapted = [
        linear for linear in model.adapted_linears() if any(t.path in parsed["vera"].layers for t in linear.slices)
    ]
    assert set(stacks) == {linear.key for linear in adapted}  # every layer "vera" adapted keeps its stack
    targeted = parsed["vera-same-family"].layers
    for linear in adapted:  # slot 0 cleared: only slot 1's projections have work
        expected = [(j, (t.out_start, t.out_features)) for j, t in enumerate(linear.slices) if t.path in targeted]
        assert stacks[linear.key].active_slices() == expected
        assert not stacks[linear.key].lambda_b[0].any() and not stacks[linear.key].lambda_d[:, 0].any()

    _load(manager, randlora=1)  # the projection family's last adapter leaves
    assert not vera.bases and not vera.layers and vera.family_of == [None, None]
    assert list(randlora.bases) == [parsed["randlora"].family.key()]
    _load(manager, dora=0)  # a LoRA-family slot becomes another LoRA-family slot
    assert lora.slot_factors[0] is not None and lora.slot_factors[1] is None
    _load(manager, vera=0)  # then a VeRA slot: the projections are generated again
    assert lora.slot_factors == [None, None] and list(vera.bases) == [key] and vera.generated == 2
    assert manager.loads == 6


def test_the_plan_holds_what_each_kind_reads(tiny):
    model, parsed = tiny
    manager = _manager(model, parsed, num_slots=4)
    slot = {"lora": 0, "vera": 1, "randlora": 2, "dora": 3}
    _load(manager, **slot)
    assert manager.plan([], 3) is None
    only_lora = manager.plan([TokenGroup(slot["lora"], 0, 2), TokenGroup(slot["dora"], 3, 4)], 4)
    assert isinstance(only_lora, LoraRows)  # one store: its part, no wrapper
    assert only_lora.slot_factors is manager.store_for("lora").slot_factors  # by reference, never copied
    mixed = manager.plan(
        [
            TokenGroup(slot["lora"], 0, 2),
            TokenGroup(slot["vera"], 2, 3),
            TokenGroup(slot["randlora"], 3, 5),
            TokenGroup(slot["vera"], 6, 7),
        ],
        7,
    )
    assert isinstance(mixed, StepPlan)
    assert [type(p) for p in mixed.parts] == [LoraRows, VeraRows, RandLoraRows]
    vera_part = mixed.parts[1]
    assert vera_part.rows.token_slots.tolist() == [slot["vera"]] * 2 and vera_part.rows.rows.tolist() == [2, 6]
    # The torch path keeps U (PEFT's op order) and nothing else of a RandLoRA adapter: no λ/Γ copies.
    projections = [
        p
        for layers in manager.store_for("randlora").layers.values()
        for per_layer in layers.values()
        for p in per_layer.values()
    ]
    assert projections and all(p.stack is None and p.pieces[slot["randlora"]] is not None for p in projections)
    assert {f for p in projections for f in type(p.pieces[slot["randlora"]]).__slots__} == {"U", "scale"}


def test_kernels_never_import_server():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(m == "server" or m.startswith("server.") for m in modules), f"{path.name} imports {modules}"
