"""Adapter upload parsing (PEFT LoRA / rsLoRA / DoRA / AdaLoRA / VeRA / RandLoRA), on-disk store and registry."""

from .canonical import canonical_files
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
from .kinds import KIND_PARSERS
from .peft_config import parse_adapter
from .projections import (
    ProjectionFamily,
    generate_projections,
    randlora_layer_bases,
    randlora_scaled_bases,
    vera_layer_bases,
)
from .registry import AdapterInfo, AdapterRegistry
from .store import AdapterStore, content_version, validate_adapter_id
from .tenants import DEFAULT_TENANT, AdapterRef, TenantStores, validate_tenant
from .types import BaseModelSpec, LayerFactors, ParsedAdapter, RandLoraFactors, TargetLayer, VeraFactors

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterRef",
    "AdapterRegistry",
    "AdapterStore",
    "AdapterTooLarge",
    "BaseModelSpec",
    "DEFAULT_TENANT",
    "InvalidAdapter",
    "InvalidAdapterId",
    "KIND_PARSERS",
    "LayerFactors",
    "MalformedUpload",
    "ParsedAdapter",
    "ProjectionFamily",
    "RandLoraFactors",
    "StoreConflict",
    "StoreCorrupted",
    "TargetLayer",
    "TenantStores",
    "UnsupportedAdapter",
    "VeraFactors",
    "canonical_files",
    "content_version",
    "generate_projections",
    "parse_adapter",
    "randlora_layer_bases",
    "randlora_scaled_bases",
    "validate_adapter_id",
    "validate_tenant",
    "vera_layer_bases",
]
