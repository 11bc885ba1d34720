"""Registry of kind parsers, keyed by ``peft_type``.

A parser takes (config dict, float32 tensors by key, BaseModelSpec) and returns a ParsedAdapter.
New kinds plug in by adding an entry to ``KIND_PARSERS``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..types import BaseModelSpec, ParsedAdapter
from .adalora import parse_adalora
from .lora import parse_lora

KindParser = Callable[[dict[str, Any], dict[str, torch.Tensor], BaseModelSpec], ParsedAdapter]

KIND_PARSERS: dict[str, KindParser] = {
    "LORA": parse_lora,
    "ADALORA": parse_adalora,
}

# Known PEFT types that are planned but not implemented yet: rejected with a specific message.
RESERVED_KINDS: dict[str, str] = {
    "VERA": "VeRA adapters are not supported yet",
    "RANDLORA": "RandLoRA adapters are not supported yet",
}

__all__ = ["KIND_PARSERS", "RESERVED_KINDS", "KindParser"]
