"""The publish protocol: O_DIRECT writes and their fallback, concurrent fsyncs, one fsync for both
renames (and scan()'s recovery of the one crash state that allows), failures leaving the store
unchanged, and real kill -9s of a publishing process."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adapters_store import AdapterStore, InvalidAdapterId, content_version
from adapters_store import store as store_mod
from tests.adapters_store.test_store_disk import FILES_V1, FILES_V2, snapshot

REPO = Path(__file__).resolve().parents[2]


def big_files(size: int, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": rng.randbytes(size)}


SIZES = [
    store_mod.DIRECT_MIN_BYTES - 1,
    store_mod.DIRECT_MIN_BYTES,
    store_mod.DIRECT_CHUNK,
    store_mod.DIRECT_CHUNK + 1,
    2 * store_mod.DIRECT_CHUNK + 4097,
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direct_io", [True, False])
def test_large_files_round_trip(tmp_path, size, direct_io):
    st = AdapterStore(tmp_path, direct_io=direct_io)
    files = big_files(size, seed=size)
    v = st.publish("a", files, {"n": 1})
    assert v == content_version(files)  # same versions as any earlier store wrote
    assert st.read("a", v) == files
    assert (tmp_path / "a" / v / "adapter_model.safetensors").stat().st_size == size
    assert st.scan() == {"a": v}
    assert {p.name for p in tmp_path.iterdir()} == {"a"}


def test_file_system_without_direct_io_falls_back(tmp_path, monkeypatch):
    real_open = os.open
    refused = []

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            refused.append(path)
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_mod.os, "open", no_direct)
    st = AdapterStore(tmp_path)
    files = big_files(3 << 20)
    v = st.publish("a", files, {})
    assert st.read("a", v) == files
    v2 = st.publish("b", big_files(3 << 20, seed=1), {})
    assert st.read("b", v2) == big_files(3 << 20, seed=1)
    assert len(refused) == (1 if hasattr(os, "O_DIRECT") else 0)  # tried once, then remembered
    assert {p.name for p in tmp_path.iterdir()} == {"a", "b"}


@pytest.mark.parametrize("fail", ["write", "fsync", "fsync-helper", "mkdir"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_publish_leaves_store_identical(tmp_path, monkeypatch, fail, existing):
    st = AdapterStore(tmp_path)
    if existing:
        st.publish("a", FILES_V1, {"x": 1})
    before = snapshot(tmp_path)
    real = {"write": os.write, "fsync": os.fsync, "mkdir": os.mkdir}
    calls = []

    def failing(name):
        def fn(*args, **kwargs):
            calls.append(name)
            hit = name == fail.split("-")[0] and (fail != "fsync-helper" or len(calls) > 1)
            if hit and (fail != "write" or len(args[1]) > 1000):  # "write": the big file's
                raise OSError(errno.ENOSPC, "simulated failure")
            return real[name](*args, **kwargs)

        return fn

    for name in real:
        monkeypatch.setattr(store_mod.os, name, failing(name))
    with pytest.raises(OSError, match="simulated failure"):
        st.publish("a", big_files(2 << 20), {"x": 2})
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert st.scan() == ({"a": st.current("a")} if existing else {})


def test_one_fsync_of_the_adapter_dir_covers_both_renames(tmp_path, monkeypatch):
    st = AdapterStore(tmp_path)
    st.publish("a", FILES_V1, {})
    events = []
    real_replace, real_fsync, real_open = os.replace, os.fsync, os.open
    fd_paths = {}

    def rec_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        fd_paths[fd] = Path(path)
        return fd

    monkeypatch.setattr(store_mod.os, "open", rec_open)
    monkeypatch.setattr(
        store_mod.os, "replace", lambda s, d: (events.append(("replace", Path(d).name)), real_replace(s, d))[1]
    )
    monkeypatch.setattr(
        store_mod.os, "fsync", lambda fd: (events.append(("fsync", fd_paths.get(fd))), real_fsync(fd))[1]
    )
    v2 = st.publish("a", FILES_V2, {})
    monkeypatch.undo()
    first_replace = events.index(("replace", v2))
    before, after = events[:first_replace], events[first_replace:]
    synced = sorted(p.name if not p.name.startswith(".tmp-") else ".tmp-" for kind, p in before if kind == "fsync")
    # every file of the version, the temp dir holding them and CURRENT's temp file; then the renames
    assert synced == sorted([*FILES_V2, "meta.json", "manifest.json", ".tmp-", ".tmp-"])
    assert after == [("replace", v2), ("replace", "CURRENT"), ("fsync", tmp_path / "a")]


def test_scan_recovers_when_current_names_a_lost_version(tmp_path):
    """The state a power loss can leave on a file system that does not keep renames in order:
    CURRENT durable, the version dir it names not. The previous version becomes current again."""
    st = AdapterStore(tmp_path)
    v1 = st.publish("a", FILES_V1, {"n": 1})
    lost = content_version(FILES_V2)
    (tmp_path / "a" / "CURRENT").write_text(lost + "\n")
    (tmp_path / ".tmp-0123456789abcdef").mkdir()  # the temp dir whose rename was lost
    fresh = AdapterStore(tmp_path)
    assert fresh.scan() == {"a": v1}
    assert fresh.current("a") == v1 and fresh.read("a", v1) == FILES_V1
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"CURRENT", v1}
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_scan_recovery_picks_the_newest_complete_version(tmp_path):
    st = AdapterStore(tmp_path)
    v1 = st.publish("a", FILES_V1, {})
    v2 = st.publish("a", FILES_V2, {})  # v1 stays (the server would have removed it)
    old = time.time() - 100
    os.utime(tmp_path / "a" / v1 / "manifest.json", (old, old))
    (tmp_path / "a" / "CURRENT").write_text(content_version(big_files(10)) + "\n")
    assert AdapterStore(tmp_path).scan() == {"a": v2}
    assert st.versions("a") == [v2]


def test_scan_does_not_resurrect_deleted_or_never_published_adapters(tmp_path):
    st = AdapterStore(tmp_path)
    st.publish("gone", FILES_V1, {})
    (tmp_path / "gone" / "CURRENT").unlink()  # a delete interrupted after its first step
    (tmp_path / "new").mkdir()  # a first publish whose version rename was lost
    (tmp_path / "new" / "CURRENT").write_text(content_version(FILES_V2) + "\n")
    assert AdapterStore(tmp_path).scan() == {}
    assert list(tmp_path.iterdir()) == []


CHILD = textwrap.dedent("""
    import random, sys, types
    from pathlib import Path
    # The store without the package's __init__ (which imports torch): a fast-starting child.
    pkg = types.ModuleType("adapters_store"); pkg.__path__ = [sys.argv[1] + "/adapters_store"]
    sys.modules["adapters_store"] = pkg
    from adapters_store.store import AdapterStore
    st = AdapterStore(Path(sys.argv[2]))
    first = int(sys.argv[3])
    for i in range(first, first + 10_000):
        files = {"adapter_config.json": b"{}", "adapter_model.safetensors": random.Random(i).randbytes(1_500_000 + i)}
        previous = st.current("a")
        v = st.publish("a", files, {"i": i})
        if previous is not None and previous != v:
            st.remove_version("a", previous)   # as the server does right after a publish
        print(i, v, flush=True)
""")


def test_kill_9_while_publishing_leaves_old_or_new(tmp_path):
    """A child publishes new versions of one adapter (and removes the old ones, as the server does)
    as fast as it can and is killed with SIGKILL at random moments. After each kill, scan() finds the
    last acknowledged version or the one that was being published, complete, and nothing else."""

    def version_of(i: int) -> str:
        return content_version(
            {"adapter_config.json": b"{}", "adapter_model.safetensors": random.Random(i).randbytes(1_500_000 + i)}
        )

    rng = random.Random(0)
    store_dir = tmp_path / "store"
    first = 0
    for kill in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(REPO), str(store_dir), str(first)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        acks = [child.stdout.readline().split() for _ in range(rng.randint(1, 4))]
        time.sleep(rng.uniform(0, 0.03))  # about one publish: the kill lands anywhere in it
        child.send_signal(signal.SIGKILL)
        acks += [line.split() for line in child.stdout.read().splitlines()]  # printed before it died
        child.wait()
        last = int(acks[-1][0])
        assert acks[-1][1] == version_of(last)
        st = AdapterStore(store_dir)
        found = st.scan()
        assert found.get("a") in (version_of(last), version_of(last + 1)), (kill, last, found)
        v = found["a"]
        assert len(st.read("a", v)["adapter_model.safetensors"]) >= 1_500_000  # every file, sha256 checked
        assert {p.name for p in (store_dir / "a").iterdir()} == {"CURRENT", v}
        assert [p.name for p in store_dir.iterdir()] == ["a"]
        first = last + 2  # the next child publishes contents never seen before


def test_prewrite_is_used_for_the_same_bytes_object(tmp_path):
    st = AdapterStore(tmp_path)
    files = big_files(2 << 20)
    pre = st.prewrite("adapter_model.safetensors", files["adapter_model.safetensors"])
    assert [p.name for p in tmp_path.iterdir()] == [pre.tmp.name]  # written before publish is called
    v = st.publish("a", files, {"n": 1}, prewritten=pre)
    assert v == content_version(files) and st.read("a", v) == files and st.meta("a", v) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    # The same content again (already current): nothing new, nothing left behind.
    again = st.prewrite("adapter_model.safetensors", files["adapter_model.safetensors"])
    assert st.publish("a", files, {"n": 2}, prewritten=again) == v and st.meta("a", v) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_prewrite_of_other_bytes_is_discarded(tmp_path):
    st = AdapterStore(tmp_path)
    files = big_files(2 << 20)
    equal_copy = bytes(bytearray(files["adapter_model.safetensors"]))  # equal content, another object
    v = st.publish("a", files, {}, prewritten=st.prewrite("adapter_model.safetensors", equal_copy))
    assert st.read("a", v) == files
    other = st.prewrite("adapter_config.json", b"{}")  # a file this publish does not have
    assert st.publish("b", FILES_V1, {}, prewritten=other) == content_version(FILES_V1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("fail", ["discard", "bad id", "write", "fsync"])
def test_refused_or_failed_prewrite_leaves_store_identical(tmp_path, monkeypatch, fail):
    st = AdapterStore(tmp_path)
    st.publish("a", FILES_V1, {})
    before = snapshot(tmp_path)
    files = big_files(2 << 20)
    real_write = os.write
    if fail == "write":
        monkeypatch.setattr(
            store_mod.os,
            "write",
            lambda fd, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")) if len(b) > 1000 else real_write(fd, b),
        )
    if fail == "fsync":
        monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "io")))
    pre = st.prewrite("adapter_model.safetensors", files["adapter_model.safetensors"])
    if fail == "discard":  # the upload was refused while it was being written
        pre.discard()
    elif fail == "bad id":
        with pytest.raises(InvalidAdapterId):
            st.publish("a/../b", files, {}, prewritten=pre)
    else:
        with pytest.raises(OSError):
            st.publish("a", files, {}, prewritten=pre)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_crash_after_prewrite_leaves_garbage_scan_removes(tmp_path):
    st = AdapterStore(tmp_path)
    v = st.publish("a", FILES_V1, {})
    pre = st.prewrite("adapter_model.safetensors", big_files(2 << 20)["adapter_model.safetensors"])
    pre.written.result()  # the process dies here: nothing of it is published
    assert AdapterStore(tmp_path).scan() == {"a": v}
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
