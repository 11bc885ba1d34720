"""load_tensors: our own safetensors header validation accepts and refuses exactly what the
safetensors library does, LoRA files become zero-copy views (others own their memory), and the
NaN/Inf check finds every non-finite value and nothing else."""

from __future__ import annotations

import hashlib
import json
import random
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store import (
    AdapterStore,
    InvalidAdapter,
    MalformedUpload,
    canonical_files,
    parse_adapter,
)
from adapters_store import tensors as tensors_mod
from adapters_store.tensors import load_tensors

P = "base_model.model.model.layers.0.self_attn."


def safetensors_accepts(data: bytes) -> bool:
    try:
        st_load(data)
    except Exception:  # noqa: BLE001 - whatever safetensors raises, it refused the file
        return False
    return True


def we_accept(data: bytes) -> bool:
    try:
        tensors_mod.data_nbytes(data)
        tensors_mod._tensor_table(data)
    except MalformedUpload:
        return False
    return True


def raw_file(header: dict | str | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file from a header (dict -> JSON, padded to 8 bytes like the library) and data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    hb = header.encode() if isinstance(header, str) else header
    if isinstance(header, str) and header.startswith("{"):
        hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb) if header_len is None else header_len) + hb + data


def mixed_file() -> bytes:
    g = torch.Generator().manual_seed(0)
    return st_save(
        {
            P + "q_proj.lora_A.weight": torch.randn(4, 8, generator=g),
            P + "q_proj.lora_B.weight": torch.randn(8, 4, generator=g).half(),
            P + "k_proj.lora_A.weight": torch.randn(4, 8, generator=g).bfloat16(),
            P + "k_proj.lora_B.weight": torch.randn(8, 4, generator=g).double(),
            "counts": torch.arange(6, dtype=torch.int32).reshape(2, 3),
            "empty": torch.zeros(0, 5),
            "scalar": torch.tensor(3.5),
        },
        metadata={"format": "pt", "note": "x"},
    )


def header_and_data(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def header_cases() -> dict[str, bytes]:
    """Hand-made edge cases, valid and not."""
    header, data = header_and_data(mixed_file())
    key = P + "q_proj.lora_A.weight"
    (b, e) = header[key]["data_offsets"]
    cases: dict[str, bytes] = {"valid": raw_file(header, data)}

    def edited(name: str, fn) -> None:
        h = json.loads(json.dumps(header))
        fn(h)
        cases[name] = raw_file(h, data)

    edited("offset +4", lambda h: h[key].update(data_offsets=[b + 4, e + 4]))
    edited("offset end -4", lambda h: h[key].update(data_offsets=[b, e - 4]))
    edited("offsets reversed", lambda h: h[key].update(data_offsets=[e, b]))
    edited("offsets three", lambda h: h[key].update(data_offsets=[b, e, e]))
    edited("offsets negative", lambda h: h[key].update(data_offsets=[-1, e]))
    edited("offsets float", lambda h: h[key].update(data_offsets=[float(b), e]))
    edited("offsets bool", lambda h: h[key].update(data_offsets=[False, e]) if b == 0 else None)
    edited("offsets huge", lambda h: h[key].update(data_offsets=[b, 2**64 + e]))
    edited("shape wrong", lambda h: h[key].update(shape=[4, 7]))
    edited("shape negative", lambda h: h[key].update(shape=[-4, -8]))
    edited("shape float", lambda h: h[key].update(shape=[4.0, 8]))
    edited("shape string", lambda h: h[key].update(shape="4,8"))
    edited("shape overflow", lambda h: h[key].update(shape=[2**40, 2**40, 0]))
    edited("shape huge", lambda h: h[key].update(shape=[2**63, 2]))
    edited("dtype unknown", lambda h: h[key].update(dtype="F31"))
    edited("dtype lowercase", lambda h: h[key].update(dtype="f32"))
    edited("dtype other size", lambda h: h[key].update(dtype="F16"))
    edited("dtype int same size", lambda h: h[key].update(dtype="I32"))
    edited("dtype F8", lambda h: h[key].update(dtype="F8_E4M3", shape=[4, 32]))
    edited("dtype F4", lambda h: h[key].update(dtype="F4", shape=[4, 64]))
    edited("dtype missing", lambda h: h[key].pop("dtype"))
    edited("shape missing", lambda h: h[key].pop("shape"))
    edited("offsets missing", lambda h: h[key].pop("data_offsets"))
    edited("extra field", lambda h: h[key].update(extra=1))
    edited("entry not object", lambda h: h.update({key: [1, 2]}))
    edited("entry removed", lambda h: h.pop(key))
    edited("metadata null", lambda h: h.update(__metadata__=None))
    edited("metadata int value", lambda h: h["__metadata__"].update(n=1))
    edited("metadata list", lambda h: h.update(__metadata__=["a"]))
    edited("metadata removed", lambda h: h.pop("__metadata__"))
    cases["empty header"] = raw_file("{}")
    cases["header list"] = raw_file("[]")
    cases["header leading space"] = raw_file(" " + json.dumps(header), data)
    cases["header leading newline"] = raw_file("\n" + json.dumps(header), data)
    cases["header not utf-8"] = raw_file(b'{"\xff":1}')
    cases["header lone surrogate key"] = raw_file(
        json.dumps({"\ud800": header[key], **{k: v for k, v in header.items() if k != key}}, ensure_ascii=True), data
    )
    cases["header NaN"] = raw_file('{"__metadata__":{"a":NaN}}')
    cases["header trailing garbage"] = raw_file(json.dumps(header) + "x", data)
    cases["header trailing NUL"] = raw_file(json.dumps(header).encode() + b"\0\0", data)
    cases["header deep"] = raw_file("[" * 100_000 + "]" * 100_000)
    cases["header big int"] = raw_file('{"x":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,0]}}')
    dup = json.dumps(header)[:-1] + "," + json.dumps({key: header[key]})[1:]
    cases["duplicate key, same entry"] = raw_file(dup, data)
    other = P + "k_proj.lora_A.weight"
    dup = json.dumps(header)[:-1] + "," + json.dumps({key: header[other]})[1:]
    cases["duplicate key, other entry"] = raw_file(dup, data)
    cases["data one byte short"] = raw_file(header, data[:-1])
    cases["data one byte long"] = raw_file(header, data + b"\0")
    cases["header length too large"] = raw_file(json.dumps(header), data, header_len=2**62)
    cases["header length +1"] = mixed_file()[:8] + b"x"
    cases["shorter than 8 bytes"] = b"\x01\0\0"
    cases["zero-size only"] = raw_file({"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}})
    cases["zero-size with bytes"] = raw_file(
        {"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 4]}}, b"\0" * 4
    )
    return cases


@pytest.mark.parametrize("name, data", list(header_cases().items()))
def test_header_validation_matches_safetensors(name, data):
    assert we_accept(data) == safetensors_accepts(data), name


def test_random_header_mutations_match_safetensors():
    """Byte flips, insertions and deletions anywhere in the header (and its length field)."""
    base = mixed_file()
    (n,) = struct.unpack("<Q", base[:8])
    rng = random.Random(1234)
    alphabet = b'{}[]",:0123456789-.eE FIBUCtrufalsn_\\'
    accepted = 0
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(0, 8 + n)
            op = rng.random()
            if op < 0.6:
                data[pos] = rng.choice(alphabet) if rng.random() < 0.8 else rng.randrange(256)
            elif op < 0.8:
                data[pos:pos] = bytes([rng.choice(alphabet)])
            else:
                del data[pos]
        data = bytes(data)
        ours = we_accept(data)
        assert ours == safetensors_accepts(data), data[: 8 + n + 8]
        accepted += ours
    assert accepted > 50  # the mutations also produce valid files, whose tensors are compared below


@pytest.mark.parametrize("name, data", [(k, v) for k, v in header_cases().items() if safetensors_accepts(v)])
def test_accepted_files_give_the_same_tensors(name, data):
    ref = st_load(data)
    _, table = tensors_mod._tensor_table(data)
    assert [k for k, *_ in table] == sorted(ref)
    for key, dtype, shape, _, _ in table:
        assert ref[key].dtype == dtype and tuple(ref[key].shape) == shape
    floats = {k: v for k, v in ref.items() if v.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
    if len(floats) == len(ref):
        got = load_tensors(data, 2**30)
        assert list(got) == sorted(ref)
        for k, v in ref.items():
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k
    else:  # a non-float tensor is refused by name, after the file was found valid
        with pytest.raises(InvalidAdapter, match="expected a float dtype"):
            load_tensors(data, 2**30)


def lora_bytes(dtype=torch.float32, seed=0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return st_save(
        {
            P + f"{m}.lora_{ab}.weight": torch.randn(*((4, 64) if ab == "A" else (64, 4)), generator=g).to(dtype)
            for m in ("q_proj", "v_proj")
            for ab in "AB"
        }
    )


def buffer_range(data: bytes) -> tuple[int, int]:
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    return start, start + len(data)


def test_lora_files_are_zero_copy_views_other_files_own_their_memory():
    data = lora_bytes()
    lo, hi = buffer_range(data)
    for key, t in load_tensors(data, 2**30).items():
        assert lo <= t.data_ptr() < hi, key
        assert torch.equal(t, st_load(data)[key])
    vera = st_save(
        {
            P + "q_proj.vera_lambda_b": torch.ones(64),
            P + "q_proj.vera_lambda_d": torch.ones(4),
            "base_model.vera_A": torch.randn(4, 64),
        }
    )
    lo, hi = buffer_range(vera)
    for key, t in load_tensors(vera, 2**30).items():
        assert not lo <= t.data_ptr() < hi, key  # a kept vector never pins the projections
    half = lora_bytes(torch.bfloat16)
    lo, hi = buffer_range(half)
    for key, t in load_tensors(half, 2**30).items():
        assert t.dtype == torch.float32 and not lo <= t.data_ptr() < hi
        assert torch.equal(t, st_load(half)[key].float())


def test_unaligned_data_is_copied():
    """A writer that does not pad the header leaves float32 data off a 4-byte boundary."""
    ref = {P + "q_proj.lora_A.weight": torch.randn(4, 64), P + "q_proj.lora_B.weight": torch.randn(64, 4)}
    header, data = header_and_data(st_save(ref))
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb) % 8) + 1)  # 8k + 1 bytes: data starts at an odd address
    raw = struct.pack("<Q", len(hb)) + hb + data
    assert safetensors_accepts(raw)
    got = load_tensors(raw, 2**30)
    for k, v in ref.items():
        assert torch.equal(got[k], v) and got[k].data_ptr() % 4 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("where", [0, 1, 40_000, -1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_found_by_name(dtype, where, bad):
    good = torch.randn(128, 1000) * 0.01
    t = good.clone()
    t.view(-1)[where] = bad
    data = st_save(
        {
            P + "q_proj.lora_A.weight": good.to(dtype).clone(),
            P + "q_proj.lora_B.weight": t.to(dtype),
            P + "v_proj.lora_A.weight": good.to(dtype).clone(),
        }
    )
    with pytest.raises(InvalidAdapter, match=r"q_proj\.lora_B\.weight' contains NaN or Inf"):
        load_tensors(data, 2**30)


def test_float64_values_beyond_float32_are_refused():
    data = st_save({P + "q_proj.lora_A.weight": torch.tensor([[1e300]], dtype=torch.float64)})
    with pytest.raises(InvalidAdapter, match="NaN or Inf"):
        load_tensors(data, 2**30)


def test_huge_finite_values_whose_sum_overflows_are_accepted():
    t = torch.full((70_000,), 3e38)  # every serial slice's float32 sum is inf; every value is finite
    t[1::2] = -3e38
    t[::4] = 3.4e38
    data = st_save({P + "q_proj.lora_A.weight": t, P + "q_proj.lora_B.weight": torch.ones(3)})
    got = load_tensors(data, 2**30)
    assert torch.equal(got[P + "q_proj.lora_A.weight"], t)


@pytest.fixture
def lora_upload(base_spec):
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for path, layer in base_spec.layers.items():
        if path.endswith(("q_proj", "v_proj")):
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.1
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.1
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return json.dumps(config).encode(), st_save(tensors)


def test_upload_bytes_unchanged_through_parse_and_publish(tmp_path, base_spec, lora_upload):
    config, weights = lora_upload
    digest = hashlib.sha256(weights).hexdigest()
    parsed = parse_adapter(config, weights, base_spec)
    lo, hi = buffer_range(weights)
    assert all(lo <= f.A.data_ptr() < hi and lo <= f.B.data_ptr() < hi for f in parsed.layers.values())
    store = AdapterStore(tmp_path)
    version = store.publish("a", canonical_files(config, weights, parsed), {})
    assert hashlib.sha256(weights).hexdigest() == digest
    assert store.read("a", version)["adapter_model.safetensors"] == weights
    reparsed = parse_adapter(config, store.read("a", version)["adapter_model.safetensors"], base_spec)
    for path, f in parsed.layers.items():
        assert torch.equal(f.A, reparsed.layers[path].A) and torch.equal(f.B, reparsed.layers[path].B)


def test_read_metadata_is_the_headers_whichever_was_loaded_last():
    a = st_save({P + "q_proj.lora_A.weight": torch.ones(2, 2)}, metadata={"format": "pt", "who": "a"})
    b = st_save({P + "q_proj.lora_A.weight": torch.ones(2, 2)}, metadata={"format": "pt", "who": "b"})
    load_tensors(a, 2**30)
    assert tensors_mod.read_metadata(a) == {"format": "pt", "who": "a"}
    load_tensors(b, 2**30)
    assert tensors_mod.read_metadata(a) == {"format": "pt", "who": "a"}
    assert tensors_mod.read_metadata(b) == {"format": "pt", "who": "b"}
    tensors_mod.read_metadata(b)["who"] = "changed"  # callers get their own dict
    assert tensors_mod.read_metadata(b)["who"] == "b"
