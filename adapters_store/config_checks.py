"""Decoding and validation of ``adapter_config.json`` fields shared by the LoRA-family parsers."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import AdapterTooLarge, InvalidAdapter, MalformedUpload, UnsupportedAdapter

MAX_CONFIG_BYTES = 1 << 20  # real configs are ~2 KB; the cap keeps json.loads cheap

# LoRA variants whose forward differs from plain LoRA (docs/adapters.md §2.1). Any non-null / true
# value selects a different LoraVariant in PEFT, so serving it as plain LoRA would be wrong.
VARIANT_FIELDS = (
    "arrow_config",
    "use_bdlora",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "kasa_config",
)
# Fields that change the base model or the layer type; we cannot reproduce them per adapter.
BASE_CHANGING_FIELDS = ("layer_replication", "target_parameters", "use_qalora")
# init_lora_weights values that only affect training-time initialisation, hence safe to serve.
SAFE_INITS = {"gaussian", "eva", "orthogonal"}
# Inits that mutate the base weights during training (adapter valid only on the mutated base),
# or select a variant ("mica"), or assume a quantised base ("loftq").
UNSAFE_INIT_PREFIXES = ("pissa", "olora", "corda", "lora_ga", "mica", "loftq")

# rank_pattern / alpha_pattern keys are regexes that PEFT feeds to re.match. Uploads are untrusted,
# so we only accept a subset without groups or nested quantifiers (no catastrophic backtracking).
_SAFE_PATTERN = re.compile(r"^[A-Za-z0-9_.\-|\\\[\]^]+[*+?]?$")
_MAX_PATTERN_LEN = 256


def load_config(config_bytes: bytes) -> dict[str, Any]:
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterTooLarge(f"adapter_config.json is {len(config_bytes)} bytes, limit is {MAX_CONFIG_BYTES}")
    try:
        cfg = json.loads(config_bytes)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise MalformedUpload(f"adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise MalformedUpload(f"adapter_config.json must be a JSON object, got {type(cfg).__name__}")
    return cfg


def get_int(cfg: dict[str, Any], key: str, default: int, *, minimum: int = 1) -> int:
    v = cfg.get(key, default)
    if v is None:
        v = default
    # bool is an int subclass in Python; `"r": true` is a broken config, not rank 1.
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InvalidAdapter(f"config field {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def get_number(cfg: dict[str, Any], key: str, default: float) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    return as_number(v, f"config field {key!r}")


def as_number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidAdapter(f"{what} must be a finite number, got {v!r}")
    return v


def as_positive(v: Any, what: str, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``): alphas. alpha 0 zeroes the adapter, a negative
    one flips it; neither is a fine-tune anyone meant to upload."""
    v = as_number(v, what)
    if v < 0 or (v == 0 and not allow_zero):
        raise InvalidAdapter(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return v


def get_positive(cfg: dict[str, Any], key: str, default: float, *, allow_zero: bool = False) -> float:
    v = cfg.get(key, default)
    return as_positive(default if v is None else v, f"config field {key!r}", allow_zero=allow_zero)


def get_bool(cfg: dict[str, Any], key: str, default: bool = False) -> bool:
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidAdapter(f"config field {key!r} must be true or false, got {v!r}")
    return v


def get_dict(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    v = cfg.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise InvalidAdapter(f"config field {key!r} must be an object, got {type(v).__name__}")
    return v


def check_common(cfg: dict[str, Any]) -> None:
    """Checks shared by LoRA and AdaLoRA: options that are not a pure per-layer delta."""
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedAdapter(
            f"config field 'bias'={bias!r} is not supported: it rewrites base-model biases; only 'none'"
        )
    for key in ("modules_to_save", "trainable_token_indices"):
        if cfg.get(key):  # null, [] and {} all mean "nothing extra"
            raise UnsupportedAdapter(f"config field {key!r} is not supported (got {cfg[key]!r})")
    for key in VARIANT_FIELDS:
        v = cfg.get(key)
        if v is not None and v is not False:
            raise UnsupportedAdapter(f"LoRA variant {key!r} is not supported (got {v!r})")
    for key in BASE_CHANGING_FIELDS:
        v = cfg.get(key)
        if v:
            raise UnsupportedAdapter(f"config field {key!r} is not supported (got {v!r})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str):
        low = init.lower()
        if low.startswith(UNSAFE_INIT_PREFIXES):
            raise UnsupportedAdapter(
                f"init_lora_weights={init!r} is not supported: the adapter assumes a modified base "
                "model or a different LoRA variant (save PiSSA/OLoRA/CorDA/LoRA-GA adapters with "
                "path_initial_model_for_weight_conversion to get a plain LoRA)"
            )
        if low not in SAFE_INITS:
            raise UnsupportedAdapter(f"unknown init_lora_weights={init!r}")
    elif init is not None and not isinstance(init, bool):
        raise InvalidAdapter(f"config field 'init_lora_weights' has invalid value {init!r}")
    # fan_in_fan_out is accepted and ignored on purpose: our base layers are nn.Linear, and PEFT
    # itself forces the flag to False for nn.Linear at load time (the stored A/B shapes never change).
    get_bool(cfg, "fan_in_fan_out")


def check_pattern_keys(cfg_key: str, pattern: dict[str, Any]) -> None:
    for k in pattern:
        if len(k) > _MAX_PATTERN_LEN or not _SAFE_PATTERN.match(k):
            raise UnsupportedAdapter(
                f"{cfg_key} key {k!r} is not supported: only module names/paths (letters, digits, "
                "'_', '.', '-', '|', character classes and one trailing quantifier) are accepted"
            )
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error as exc:
            raise InvalidAdapter(f"{cfg_key} key {k!r} is not a valid regex: {exc}") from exc


def match_pattern(pattern: dict[str, Any], path: str) -> str | None:
    """PEFT's ``get_pattern_key``: first key k (dict order) with re.match(rf"(.*\\.)?({k})$", path)."""
    for k in pattern:
        if re.match(rf"(.*\.)?({k})$", path):
            return k
    return None
