"""Entry point: validate an uploaded PEFT adapter and convert it to canonical low-rank factors."""

from __future__ import annotations

from .config_checks import load_config
from .errors import InvalidAdapter, UnsupportedAdapter
from .kinds import KIND_PARSERS
from .tensors import load_tensors, read_metadata
from .types import BaseModelSpec, ParsedAdapter


def parse_adapter(config_bytes: bytes, weights_bytes: bytes, base: BaseModelSpec) -> ParsedAdapter:
    """Parse ``adapter_config.json`` + ``adapter_model.safetensors`` bytes.

    Raises an :class:`~adapters_store.errors.AdapterError` subclass (400/413/422) naming the problem.
    The config is checked first (cheap), then the safetensors header size, then the tensors.
    """
    cfg = load_config(config_bytes)
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise InvalidAdapter("adapter_config.json has no 'peft_type'")
    if not isinstance(peft_type, str):
        raise InvalidAdapter(f"'peft_type' must be a string, got {peft_type!r}")
    key = peft_type.upper()
    parser = KIND_PARSERS.get(key)
    if parser is None:
        supported = ", ".join(sorted(KIND_PARSERS))
        raise UnsupportedAdapter(f"peft_type {peft_type!r} is not supported (supported: {supported})")
    tensors = load_tensors(weights_bytes, base.max_bytes, check_finite=base.check_values)
    return parser(cfg, tensors, base, read_metadata(weights_bytes))
