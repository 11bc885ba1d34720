"""Crash-safe versioned store: round trip, versioning, recovery scan, simulated crashes, delete."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters_store import AdapterNotFound, AdapterStore, InvalidAdapterId, StoreConflict, validate_adapter_id
from adapters_store import store as store_mod

FILES_V1 = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"\x00weights-v1"}
FILES_V2 = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"\x00weights-v2"}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every dir (None) and file (bytes) under root, by relative path."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def test_publish_read_roundtrip(tmp_path):
    st = AdapterStore(tmp_path)
    v = st.publish("my-adapter", FILES_V1, {"kind": "lora", "rank": 4})
    assert len(v) == 16 and int(v, 16) >= 0
    assert st.read("my-adapter", v) == FILES_V1
    assert st.meta("my-adapter", v) == {"kind": "lora", "rank": 4}
    assert st.current("my-adapter") == v
    assert (tmp_path / "my-adapter" / "CURRENT").read_text().strip() == v
    assert st.scan() == {"my-adapter": v}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_versions_are_content_addressed(tmp_path):
    st = AdapterStore(tmp_path)
    v1 = st.publish("a", FILES_V1, {"n": 1})
    assert st.publish("a", dict(reversed(list(FILES_V1.items()))), {"n": 2}) == v1  # same content, same version
    assert st.meta("a", v1) == {"n": 1}  # existing version kept as is
    assert st.publish("b", FILES_V1, {}) == v1  # deterministic across ids
    v2 = st.publish("a", FILES_V2, {"n": 3})
    assert v2 != v1 and st.current("a") == v2
    assert st.versions("a") == sorted([v1, v2])  # old version stays until the server retires it
    assert st.read("a", v1) == FILES_V1 and st.read("a", v2) == FILES_V2
    with pytest.raises(StoreConflict):
        st.remove_version("a", v2)  # current version cannot be removed
    st.remove_version("a", v1)
    assert st.versions("a") == [v2]
    with pytest.raises(AdapterNotFound):
        st.read("a", v1)
    # Re-publishing an older content makes it current again.
    assert st.publish("a", FILES_V1, {}) == v1 and st.current("a") == v1


def test_scan_cleans_leftovers(tmp_path):
    st = AdapterStore(tmp_path)
    v1 = st.publish("a", FILES_V1, {})
    v2 = st.publish("a", FILES_V2, {})
    (tmp_path / ".tmp-deadbeef").mkdir()
    (tmp_path / ".tmp-deadbeef" / "adapter_model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-file").write_bytes(b"x")
    # A publish of a new adapter that crashed before CURRENT was written.
    orphan = tmp_path / "orphan" / "0123456789abcdef"
    orphan.mkdir(parents=True)
    (orphan / "adapter_config.json").write_bytes(b"{}")
    (tmp_path / "a" / "stray.txt").write_bytes(b"junk")
    (tmp_path / "not an id!").mkdir()  # unknown top-level entries are left alone
    assert st.scan() == {"a": v2}
    assert not (tmp_path / ".tmp-deadbeef").exists() and not (tmp_path / ".tmp-file").exists()
    assert not (tmp_path / "orphan").exists()
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"CURRENT", v2}  # v1 and junk removed
    assert v1 not in st.versions("a")
    assert (tmp_path / "not an id!").exists()


def test_scan_drops_adapter_whose_current_version_is_incomplete(tmp_path):
    st = AdapterStore(tmp_path)
    v = st.publish("a", FILES_V1, {})
    (tmp_path / "a" / v / "adapter_model.safetensors").unlink()
    assert st.scan() == {}
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("fail_on_call", [1, 2])
@pytest.mark.parametrize("existing", [False, True])
def test_crash_during_publish_leaves_store_identical(tmp_path, monkeypatch, fail_on_call, existing):
    """os.replace #1 publishes the version dir, #2 swaps CURRENT; failing either changes nothing."""
    st = AdapterStore(tmp_path)
    if existing:
        st.publish("a", FILES_V1, {"x": 1})
    before = snapshot(tmp_path)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == fail_on_call:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated crash"):
        st.publish("a", FILES_V2, {"x": 2})
    monkeypatch.undo()
    assert len(calls) == fail_on_call
    assert snapshot(tmp_path) == before
    assert st.scan() == ({"a": st.current("a")} if existing else {})
    assert snapshot(tmp_path) == before  # nothing left for scan to clean either


def test_hard_crash_after_version_rename_is_recovered_by_scan(tmp_path, monkeypatch):
    """A real crash skips the rollback: emulate by making CURRENT's replace kill the 'process'."""
    st = AdapterStore(tmp_path)
    v1 = st.publish("a", FILES_V1, {})
    real_replace = os.replace

    class Crash(BaseException):
        pass

    def crashing_replace(src, dst):
        if Path(dst).name == "CURRENT":
            raise Crash()
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", crashing_replace)
    monkeypatch.setattr(store_mod, "_rmtree", lambda p: None)  # no cleanup happens in a crash
    with pytest.raises(Crash):
        st.publish("a", FILES_V2, {})
    monkeypatch.undo()
    assert len(st.versions("a")) == 2  # new version dir exists but was never acknowledged
    fresh = AdapterStore(tmp_path)
    assert fresh.scan() == {"a": v1}
    assert st.versions("a") == [v1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_delete(tmp_path):
    st = AdapterStore(tmp_path)
    st.publish("a", FILES_V1, {})
    v = st.publish("b", FILES_V2, {})
    assert st.delete("a") is True
    assert not (tmp_path / "a").exists()
    assert st.current("a") is None and st.versions("a") == []
    assert st.delete("a") is False
    assert st.scan() == {"b": v}


def test_delete_removes_current_first(tmp_path, monkeypatch):
    st = AdapterStore(tmp_path)
    st.publish("a", FILES_V1, {})
    monkeypatch.setattr(store_mod.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        st.delete("a")
    monkeypatch.undo()
    assert not (tmp_path / "a" / "CURRENT").exists()  # pointer gone before any dir was touched
    assert st.scan() == {}
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "bad", ["", ".hidden", "..", "../etc", "a/b", "a..b", "x" * 65, "-lead", "sp ace", "a\x00b", "é"]
)
def test_invalid_adapter_ids(tmp_path, bad):
    with pytest.raises(InvalidAdapterId) as info:
        validate_adapter_id(bad)
    assert info.value.status == 400
    with pytest.raises(InvalidAdapterId):
        AdapterStore(tmp_path).publish(bad, FILES_V1, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("good", ["a", "A1", "my.adapter_v2-final", "x" * 64, "0"])
def test_valid_adapter_ids(good):
    assert validate_adapter_id(good) == good


def test_read_rejects_bad_version_and_detects_corruption(tmp_path):
    st = AdapterStore(tmp_path)
    v = st.publish("a", FILES_V1, {})
    with pytest.raises(AdapterNotFound):
        st.read("a", "../../etc/passwd")
    with pytest.raises(AdapterNotFound):
        st.read("a", "0" * 16)
    (tmp_path / "a" / v / "adapter_model.safetensors").write_bytes(b"\x00weights-vX")  # same size
    from adapters_store import StoreCorrupted

    with pytest.raises(StoreCorrupted, match="sha256"):
        st.read("a", v)
