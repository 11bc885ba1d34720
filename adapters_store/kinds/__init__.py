"""Registry of kind parsers, keyed by ``peft_type``.

A parser takes (config dict, float32 tensors by key, BaseModelSpec, safetensors metadata) and returns
a ParsedAdapter. The metadata only matters to VeRA / RandLoRA (canonical-file marker, see
``projected.py``); the LoRA-family parsers ignore it.
New kinds plug in by adding an entry to ``KIND_PARSERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..types import BaseModelSpec, ParsedAdapter
from .adalora import parse_adalora
from .lora import parse_lora
from .randlora import parse_randlora
from .vera import parse_vera

KindParser = Callable[[dict[str, Any], dict[str, torch.Tensor], BaseModelSpec, Mapping[str, str]], ParsedAdapter]

KIND_PARSERS: dict[str, KindParser] = {
    "LORA": parse_lora,
    "ADALORA": parse_adalora,
    "VERA": parse_vera,
    "RANDLORA": parse_randlora,
}

__all__ = ["KIND_PARSERS", "KindParser"]
