"""One slot store per adapter kind, and the registry that picks it for a parsed adapter.

    SLOT_STORES: ParsedAdapter.kind -> the SlotStore class that holds adapters of that kind

The AdapterManager makes one instance of each class at startup and routes every slot load to the
store of the adapter's kind; each store lays its adapters out as its kernels read them and builds its
part of every step plan (`base.SlotStore`). The parse side has the same shape:
`adapters_store.kinds.KIND_PARSERS` maps a PEFT type to the parser that makes a ParsedAdapter.

Adding a kind: a parser (adapters_store/kinds/), its kernels' torch reference and plan part (kernels/),
one module here with its SlotStore subclass (`ProjectionFamilyStore` when it is built on shared random
projections), and one entry below.
"""

from __future__ import annotations

from server.adapters.kinds.base import SlotStore, StoreContext
from server.adapters.kinds.lora import LoraFamilyStore
from server.adapters.kinds.randlora import RandLoraStore
from server.adapters.kinds.vera import VeraStore

SLOT_STORES: dict[str, type[SlotStore]] = {
    "lora": LoraFamilyStore,
    "rslora": LoraFamilyStore,
    "adalora": LoraFamilyStore,
    "dora": LoraFamilyStore,
    "vera": VeraStore,
    "randlora": RandLoraStore,
}

__all__ = ["SLOT_STORES", "SlotStore", "StoreContext"]
