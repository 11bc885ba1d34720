"""Safe loading of ``adapter_model.safetensors`` bytes and grouping of keys by module.

Only ``safetensors`` is ever decoded (never pickle). The size limit is enforced from the header
*before* the tensors are materialised, so an oversized upload costs no extra memory.

The header is parsed and validated here, with the rules of the safetensors library itself (header
at most 100 MB of UTF-8 JSON, dtypes safetensors.torch knows, 64-bit unsigned shapes and offsets,
tensors packed back to back from offset 0 to the end of the file with exactly ``numel x dtype
size`` bytes each; ``tests/adapters_store/test_tensors_load.py`` checks we accept and refuse exactly what
``safetensors.torch.load`` does), so the tensors can be views of the upload instead of copies:

* a file that holds only LoRA-family tensors (``lora_*`` keys: everything in it is kept) gives float32
  tensors that are zero-copy views of ``weights_bytes``, which they keep alive. They alias an
  immutable ``bytes`` object, so nothing may write into them (nothing does: the parsers build new
  tensors for everything they change, and the store writes the upload's bytes as they came);
* any other file (VeRA / RandLoRA: small trained vectors next to large projections that are usually
  dropped) copies each tensor into its own buffer, so keeping a vector never keeps the projections;
* other float dtypes are converted to new float32 tensors.

Upload parsing runs beside the engine, so every whole-tensor op here works on slices below torch's
parallel grain size: one serial thread, never an OpenMP team that stalls when the engine holds the
cores (measured on a busy 2-core machine: ``isfinite(t).all()`` over the 1.85M floats of a LoRA r16
took 60 ms with 2 threads, 12 ms with one; sums of serial slices take 1-2 ms).
"""

from __future__ import annotations

import json
import struct
import warnings

import torch

from .errors import AdapterTooLarge, InvalidAdapter, MalformedUpload

KEY_PREFIX = "base_model.model."

# Dtypes we accept and upcast to float32. fp8 and integer/bool tensors are rejected: PEFT never
# saves LoRA factors in them, and silently converting quantised data would change the numbers.
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}

# The dtypes safetensors.torch can load, by their name in the header, with their size in bytes.
# A dtype missing here (or from this torch) is refused as malformed, as safetensors.torch.load does.
_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
    }.items()
    if dtype is not None
}
_MAX_HEADER = 100_000_000  # safetensors' own limit
# (raw header bytes, its __metadata__) of the last header validated, so read_metadata, called right
# after load_tensors on the same bytes, need not parse the JSON again. Compared by value.
_last_metadata: tuple[bytes, dict[str, str]] | None = None
_U64 = 2**64
# Below torch's GRAIN_SIZE (32768) an elementwise op or reduction runs on the calling thread.
_SERIAL = 32767
# Suffixes of the LoRA family's tensors: a file made only of these keeps every byte it holds.
_LORA_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_magnitude_vector",
    ".lora_A",
    ".lora_B",
    ".lora_E",
)  # the last three: AdaLoRA

# torch warns (once per process) that a tensor over a read-only buffer is writable; we know, and
# rely on nothing writing into upload views (see the module docstring). Spend that one warning here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


def data_nbytes(weights_bytes: bytes) -> int:
    """Tensor-data size of a safetensors blob: file size minus the 8-byte length and JSON header."""
    if len(weights_bytes) < 8:
        raise MalformedUpload("adapter_model.safetensors is not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", weights_bytes[:8])
    if 8 + header_len > len(weights_bytes):
        raise MalformedUpload("adapter_model.safetensors is not a safetensors file (header length exceeds file size)")
    return len(weights_bytes) - 8 - header_len


def _malformed(why: str) -> MalformedUpload:
    return MalformedUpload(f"adapter_model.safetensors is not a valid safetensors file: {why}")


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v < _U64


def _tensor_table(weights_bytes: bytes) -> tuple[int, list[tuple[str, torch.dtype, tuple[int, ...], int, int]]]:
    """(data start, [(key, dtype, shape, begin, end)] sorted by key), validated as safetensors does.

    ``begin``/``end`` are offsets into the data section. Raises MalformedUpload.
    """
    (n,) = struct.unpack("<Q", weights_bytes[:8])
    if n > _MAX_HEADER:
        raise _malformed(f"header of {n} bytes (at most {_MAX_HEADER})")
    try:
        text = bytes(weights_bytes[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"header is not UTF-8: {exc}") from None
    try:
        header = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _malformed("header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None:
        if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise _malformed("__metadata__ must be a map of strings")
        for k, v in meta.items():
            _check_utf8(k)
            _check_utf8(v)
    entries = []
    for key, info in header.items():
        _check_utf8(key)
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _malformed(f"tensor {key!r}: entry is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise _malformed(f"tensor {key!r}: unknown dtype {dtype_name!r}")
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            raise _malformed(f"tensor {key!r}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
            raise _malformed(f"tensor {key!r}: data_offsets must be two non-negative integers")
        entries.append((tuple(offsets), key, _DTYPES[dtype_name], tuple(shape)))
    entries.sort(key=lambda e: e[0])  # safetensors validates in offset order
    end = 0
    for (b, e), key, dtype, shape in entries:
        if b != end or e < b:
            raise _malformed(f"tensor {key!r}: data_offsets [{b}, {e}] do not follow the previous tensor's end {end}")
        numel = 1
        for d in shape:  # as a running product of 64-bit integers, like safetensors
            numel *= d
            if numel >= _U64:
                raise _malformed(f"tensor {key!r}: shape {list(shape)} overflows")
        nbytes = numel * dtype.itemsize
        if numel * dtype.itemsize * 8 >= _U64 or e - b != nbytes:
            raise _malformed(f"tensor {key!r}: {e - b} bytes for shape {list(shape)} of {dtype}")
        end = e
    if 8 + n + end != len(weights_bytes):
        raise _malformed(f"tensors end at byte {8 + n + end} of the data, the file has {len(weights_bytes)}")
    table = [(key, dtype, shape, b, e) for (b, e), key, dtype, shape in entries]
    table.sort(key=lambda t: t[0])
    global _last_metadata
    _last_metadata = (bytes(weights_bytes[8 : 8 + n]), dict(meta or {}))  # for read_metadata
    return 8 + n, table


def _check_utf8(s: str) -> None:
    """JSON may escape lone surrogates ("\\ud800"), which Python decodes and safetensors refuses."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _malformed(f"header string {s!r} is not valid Unicode") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _all_finite(flat: torch.Tensor) -> bool:
    """No NaN/Inf in a 1-D float32 tensor, in serial slices.

    NaN and ±Inf propagate through a sum, so finite slice sums prove the tensor finite. A slice of
    huge finite values can overflow its sum: that rare case gets the exact test.
    """
    starts = range(0, flat.numel(), _SERIAL)
    if not starts:
        return True
    sums = torch.stack([flat[i : i + _SERIAL].sum() for i in starts])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(flat[i : i + _SERIAL]).all()) for i in starts)


def _to_float32(t: torch.Tensor) -> torch.Tensor:
    """float32 copy of a float tensor, converted in serial slices."""
    out = torch.empty(t.shape, dtype=torch.float32)
    src, dst = t.reshape(-1), out.view(-1)
    for start in range(0, src.numel(), _SERIAL):
        dst[start : start + _SERIAL].copy_(src[start : start + _SERIAL])
    return out


def load_tensors(weights_bytes: bytes, max_bytes: int, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Decode, size-check, dtype-check and (unless `check_finite` is False) NaN/Inf-check; returns
    float32 tensors (sorted by key).

    See the module docstring for which tensors are views of ``weights_bytes``.
    """
    nbytes = data_nbytes(weights_bytes)
    if nbytes > max_bytes:
        raise AdapterTooLarge(f"adapter_model.safetensors holds {nbytes} bytes of tensors, limit is {max_bytes}")
    start, table = _tensor_table(weights_bytes)
    for key, dtype, _, _, _ in table:
        if dtype not in _FLOAT_DTYPES:
            raise InvalidAdapter(f"tensor {key!r} has dtype {dtype}, expected a float dtype")
    views = all(key.endswith(_LORA_SUFFIXES) for key, *_ in table)
    buffer = memoryview(weights_bytes)
    address = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr() + start  # of the data section
    out: dict[str, torch.Tensor] = {}
    for key, dtype, shape, b, e in table:
        if b == e:
            t = torch.empty(shape, dtype=dtype)
        elif views and (address + b) % dtype.itemsize == 0:  # aligned, as safetensors writers pad
            t = torch.frombuffer(buffer, dtype=dtype, count=(e - b) // dtype.itemsize, offset=start + b)
        else:  # own memory: one serial memcpy, as safetensors.torch.load makes
            t = torch.frombuffer(bytearray(buffer[start + b : start + e]), dtype=dtype)
        t = t.view(shape)
        out[key] = t if dtype == torch.float32 else _to_float32(t)
    bad = _first_non_finite(out, table, weights_bytes, start) if check_finite else None
    if bad is not None:
        raise InvalidAdapter(f"tensor {bad!r} contains NaN or Inf")
    return out


def _first_non_finite(out: dict[str, torch.Tensor], table, weights_bytes: bytes, start: int) -> str | None:
    """The first key (in key order) whose tensor has a NaN or Inf, else None."""
    size = len(weights_bytes) - start
    if size and all(dtype == torch.float32 for _, dtype, *_ in table):
        # One pass over the whole data section: float32 tensors are packed back to back.
        section = torch.frombuffer(memoryview(weights_bytes), dtype=torch.float32, offset=start, count=size // 4)
        if _all_finite(section):
            return None
    for key, t in out.items():
        if t.numel() and not _all_finite(t.reshape(-1)):
            return key
    return None


def group_by_module(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
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
        rest = key[len(KEY_PREFIX) :]
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
    raw = bytes(weights_bytes[8 : 8 + header_len])
    cached = _last_metadata
    if cached is not None and cached[0] == raw:  # the header load_tensors just parsed
        return dict(cached[1])
    try:
        meta = json.loads(raw).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}
