"""The files the store persists for a parsed upload.

VeRA / RandLoRA uploads with save_projection=true carry the shared projections (RandLoRA even
1 + N copies of them), which are usually just the output of the seed: the canonical weights file
keeps only the trained vectors, plus the model-level projections when they are the adapter's own
(stored family). Its safetensors metadata names the family, which is what lets a config that says
save_projection=true re-parse without projections. The config bytes are kept as uploaded.
Other kinds are stored exactly as uploaded.

Invariant (tested): ``parse_adapter(*canonical files)`` gives the same ParsedAdapter as the upload.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save as st_save

from .kinds.projected import CANONICAL_META_KEY, MODEL_PREFIX
from .tensors import KEY_PREFIX
from .types import ParsedAdapter, RandLoraFactors, VeraFactors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _vectors(path: str, f: VeraFactors | RandLoraFactors) -> dict[str, torch.Tensor]:
    key = KEY_PREFIX + path + "."
    if isinstance(f, VeraFactors):
        return {key + "vera_lambda_b": f.lambda_b, key + "vera_lambda_d": f.lambda_d}
    return {key + "randlora_lambda": f.lam, key + "randlora_gamma": f.gamma}


def _deterministic_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a sorted JSON header.

    safetensors serialises ``__metadata__`` from a hash map, so its key order (hence the bytes, hence
    the store's content version) can change from one call to the next. The header is only JSON with
    offsets relative to the data section, so re-emitting it with sorted keys keeps the file valid.
    """
    raw = st_save(tensors)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = metadata
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the data section stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(hb)) + hb + raw[8 + n :]


def canonical_files(config_bytes: bytes, weights_bytes: bytes, parsed: ParsedAdapter) -> dict[str, bytes]:
    """{file name: bytes} to persist for ``parsed`` (the result of parsing these same two files)."""
    if parsed.family is None:
        return {CONFIG_FILE: config_bytes, WEIGHTS_FILE: weights_bytes}
    tensors: dict[str, torch.Tensor] = {}
    for path, f in parsed.layers.items():
        if not isinstance(f, (VeraFactors, RandLoraFactors)):
            raise TypeError(f"{parsed.kind} adapter has {type(f).__name__} at {path!r}")
        tensors.update(_vectors(path, f))
    if parsed.projections is not None:  # stored family: model-level copy only
        A, B = parsed.projections
        tensors[MODEL_PREFIX + f"{parsed.family.kind}_A"] = A
        tensors[MODEL_PREFIX + f"{parsed.family.kind}_B"] = B
    # float32, own contiguous storage: the parser upcast everything already, so values are unchanged.
    tensors = {k: t.detach().to(torch.float32).contiguous().clone() for k, t in tensors.items()}
    metadata = {"format": "pt", CANONICAL_META_KEY: parsed.family.key()}
    return {CONFIG_FILE: config_bytes, WEIGHTS_FILE: _deterministic_safetensors(tensors, metadata)}
