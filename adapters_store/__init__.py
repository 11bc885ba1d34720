"""Adapter upload parsing (PEFT LoRA / rsLoRA / DoRA / AdaLoRA), on-disk store and registry."""

from .errors import (
    AdapterError,
    AdapterNotFound,
    AdapterTooLarge,
    InvalidAdapter,
    InvalidAdapterId,
    MalformedUpload,
    StoreConflict,
    StoreCorrupted,
    UnsupportedAdapter,
)
from .kinds import KIND_PARSERS, RESERVED_KINDS
from .peft_config import parse_adapter
from .registry import AdapterInfo, AdapterRegistry
from .store import AdapterStore, content_version, validate_adapter_id
from .types import BaseModelSpec, LayerFactors, ParsedAdapter, TargetLayer

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterRegistry",
    "AdapterStore",
    "AdapterTooLarge",
    "BaseModelSpec",
    "InvalidAdapter",
    "InvalidAdapterId",
    "KIND_PARSERS",
    "LayerFactors",
    "MalformedUpload",
    "ParsedAdapter",
    "RESERVED_KINDS",
    "StoreConflict",
    "StoreCorrupted",
    "TargetLayer",
    "UnsupportedAdapter",
    "content_version",
    "parse_adapter",
    "validate_adapter_id",
]
