"""canonical_files: what the store keeps re-parses to the same adapter, and VeRA/RandLoRA files shrink."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store import (
    AdapterStore,
    InvalidAdapter,
    LayerFactors,
    ParsedAdapter,
    canonical_files,
    parse_adapter,
)

CFG, W = "adapter_config.json", "adapter_model.safetensors"


def assert_same(a: ParsedAdapter, b: ParsedAdapter) -> None:
    assert (a.kind, a.target_modules, a.family, a.projection) == (b.kind, b.target_modules, b.family, b.projection)
    assert list(a.layers) == list(b.layers)
    for path, fa in a.layers.items():
        fb = b.layers[path]
        assert type(fa) is type(fb)
        for name in fa.__slots__:
            x, y = getattr(fa, name), getattr(fb, name)
            if isinstance(x, torch.Tensor):
                assert y is not None and x.dtype == y.dtype and torch.equal(x, y), f"{path}.{name}"
            else:
                assert x == y, f"{path}.{name}"
    if a.projections is None:
        assert b.projections is None
    else:
        assert all(torch.equal(x, y) for x, y in zip(a.projections, b.projections))


def _tamper(w_b: bytes, kind: str) -> bytes:
    t = st_load(w_b)
    for k in list(t):
        if k.endswith(f"{kind}_B"):
            t[k] = t[k] * 1.01
    return st_save(t, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name",
    [
        "vera",
        "vera_noproj",
        "vera_all_r7",
        "randlora",
        "randlora_noproj",
        "randlora_sparse_all",
        "randlora_vsparse_noproj",
    ],
)
def test_round_trip_projected(projected_adapters, base_spec, name):
    cfg_b, w_b, _ = projected_adapters[name]
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    files = canonical_files(cfg_b, w_b, parsed)
    assert set(files) == {CFG, W} and files[CFG] == cfg_b  # config kept byte for byte
    assert not any(k.startswith(f"base_model.{parsed.kind}_") or k.endswith(("_A", "_B")) for k in st_load(files[W])), (
        "seed projections must be dropped"
    )
    assert_same(parsed, parse_adapter(files[CFG], files[W], base_spec))
    assert canonical_files(cfg_b, w_b, parsed) == files  # deterministic -> stable content version


@pytest.mark.parametrize("name", ["vera", "randlora"])
def test_round_trip_stored_family(projected_adapters, base_spec, name):
    cfg_b, w_b, _ = projected_adapters[name]
    parsed = parse_adapter(cfg_b, _tamper(w_b, name), base_spec)
    assert parsed.projection == "stored"
    files = canonical_files(cfg_b, _tamper(w_b, name), parsed)
    keys = set(st_load(files[W]))
    assert {f"base_model.{name}_A", f"base_model.{name}_B"} <= keys  # model-level copy only
    assert not any(k.startswith("base_model.model.") and k.endswith(("_A", "_B")) for k in keys)
    again = parse_adapter(files[CFG], files[W], base_spec)
    assert_same(parsed, again)
    assert again.family.stored_digest == parsed.family.stored_digest


@pytest.mark.parametrize("name", ["lora_bias", "dora", "adalora"])
def test_other_kinds_unchanged(adapters, base_spec, name):
    cfg_b, w_b, _ = adapters[name]
    parsed = parse_adapter(cfg_b, w_b, base_spec)
    assert canonical_files(cfg_b, w_b, parsed) == {CFG: cfg_b, W: w_b}
    assert all(isinstance(f, LayerFactors) for f in parsed.layers.values()) and parsed.projection is None


def test_canonical_files_are_small(projected_adapters, base_spec, tmp_path):
    sizes = {}
    for name in ("vera", "randlora"):
        cfg_b, w_b, _ = projected_adapters[name]
        files = canonical_files(cfg_b, w_b, parse_adapter(cfg_b, w_b, base_spec))
        sizes[name] = (len(w_b), len(files[W]))
        # And the store persists exactly those bytes.
        store = AdapterStore(tmp_path / name)
        version = store.publish(name, files, {"info": {}})
        assert store.read(name, version) == files
    # VeRA r=16 q/k/v/o: 16 lambda vectors (~4 KB) vs + (16x64 + 64x16) fp32 projections.
    assert sizes["vera"][1] * 2.5 < sizes["vera"][0], sizes
    # RandLoRA holds 1 + 8 copies of its bases: 181,904 -> ~14 KB (docs/adapters.md §4.2).
    assert sizes["randlora"][0] == 181_904 and sizes["randlora"][1] * 10 < sizes["randlora"][0], sizes


def test_marker_is_what_allows_missing_projections(projected_adapters, base_spec):
    """The canonical seed file of a save_projection=true config re-parses only thanks to its metadata."""
    cfg_b, w_b, _ = projected_adapters["vera"]
    assert json.loads(cfg_b)["save_projection"] is True
    files = canonical_files(cfg_b, w_b, parse_adapter(cfg_b, w_b, base_spec))
    tensors = st_load(files[W])
    with pytest.raises(InvalidAdapter, match="save_projection=true"):
        parse_adapter(cfg_b, st_save(tensors, metadata={"format": "pt"}), base_spec)
    cfg = json.loads(cfg_b)
    cfg["projection_prng_key"] = 1  # a different family than the one the file was made for
    with pytest.raises(InvalidAdapter, match="metadata names projection family"):
        parse_adapter(json.dumps(cfg).encode(), files[W], base_spec)


def test_canonical_metadata_is_pt_format(projected_adapters, base_spec, tmp_path):
    cfg_b, w_b, _ = projected_adapters["randlora"]
    files = canonical_files(cfg_b, w_b, parse_adapter(cfg_b, w_b, base_spec))
    (tmp_path / W).write_bytes(files[W])
    with safe_open(tmp_path / W, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["adapters_store.projection_family"].startswith("randlora-k0-r8-")
