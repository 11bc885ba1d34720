"""Safe loading of ``adapter_model.safetensors`` bytes and grouping of keys by module.

Only ``safetensors`` is ever decoded (never pickle). The size limit is enforced from the header
*before* the tensors are materialised, so an oversized upload costs no extra memory.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as _st_load

from .errors import AdapterTooLarge, InvalidAdapter, MalformedUpload

KEY_PREFIX = "base_model.model."

# Dtypes we accept and upcast to float32. fp8 and integer/bool tensors are rejected: PEFT never
# saves LoRA factors in them, and silently converting quantised data would change the numbers.
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


def data_nbytes(weights_bytes: bytes) -> int:
    """Tensor-data size of a safetensors blob: file size minus the 8-byte length and JSON header."""
    if len(weights_bytes) < 8:
        raise MalformedUpload("adapter_model.safetensors is not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", weights_bytes[:8])
    if 8 + header_len > len(weights_bytes):
        raise MalformedUpload(
            "adapter_model.safetensors is not a safetensors file (header length exceeds file size)"
        )
    return len(weights_bytes) - 8 - header_len


def load_tensors(weights_bytes: bytes, max_bytes: int) -> dict[str, torch.Tensor]:
    """Decode, size-check, dtype-check and NaN/Inf-check; returns float32 tensors."""
    nbytes = data_nbytes(weights_bytes)
    if nbytes > max_bytes:
        raise AdapterTooLarge(
            f"adapter_model.safetensors holds {nbytes} bytes of tensors, limit is {max_bytes}"
        )
    try:
        raw = _st_load(weights_bytes)
    except Exception as exc:  # SafetensorError and friends: anything undecodable is a bad upload
        raise MalformedUpload(f"adapter_model.safetensors is not a valid safetensors file: {exc}") from exc
    total = sum(t.numel() * t.element_size() for t in raw.values())
    if total > max_bytes:  # defensive: the header-based check above should already cover this
        raise AdapterTooLarge(f"adapter tensors total {total} bytes, limit is {max_bytes}")
    out: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise InvalidAdapter(f"tensor {key!r} has dtype {t.dtype}, expected a float dtype")
        t = t.to(torch.float32)
        if t.numel() and not torch.isfinite(t).all():
            raise InvalidAdapter(f"tensor {key!r} contains NaN or Inf")
        out[key] = t
    return out


def group_by_module(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    """Split ``base_model.model.<path>.<suffix>`` keys into ``{path: {suffix: tensor}}``.

    Any key that does not have the prefix and one of the allowed suffixes is rejected: an unknown
    key means an adapter feature we do not implement, and ignoring it would serve wrong outputs.
    """
    # Longest suffix first so "lora_B.bias" is not mistaken for something ending in ".bias".
    ordered = sorted(suffixes, key=len, reverse=True)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        if not key.startswith(KEY_PREFIX):
            raise InvalidAdapter(f"unexpected tensor key {key!r} (expected prefix {KEY_PREFIX!r})")
        rest = key[len(KEY_PREFIX):]
        for suffix in ordered:
            if rest.endswith("." + suffix):
                path = rest[: -len(suffix) - 1]
                if path:
                    groups.setdefault(path, {})[suffix] = tensors[key]
                    break
        else:
            allowed = ", ".join(suffixes)
            raise InvalidAdapter(f"unexpected tensor key {key!r} (allowed suffixes: {allowed})")
    return groups


def check_shape(key: str, t: torch.Tensor, expected: tuple[int, ...], why: str | None = None) -> None:
    if tuple(t.shape) != expected:
        suffix = f" ({why})" if why else ""
        raise InvalidAdapter(f"tensor {key!r} has shape {list(t.shape)}, expected {list(expected)}{suffix}")


def read_metadata(weights_bytes: bytes) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors header ({} if absent or not a str->str map).

    Call after :func:`load_tensors` accepted the bytes, so the header is known to be valid JSON.
    """
    (header_len,) = struct.unpack("<Q", weights_bytes[:8])
    try:
        meta = json.loads(weights_bytes[8 : 8 + header_len]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}
