"""The shared S3 store against a real S3-compatible server (SeaweedFS on loopback): layout and tenancy,
conditional pointer writes (one winner, the loser told), a kill -9 mid-upload, garbage collection, and
two adapter services over one bucket agreeing within 2 s (replicas without Ray)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from botocore.exceptions import ClientError

from adapters_store import AdapterNotFound, AdapterRef, AdapterRegistry, StoreConflict
from adapters_store.s3 import POINTERS, Pointer, S3TenantStores, make_client, parse_s3_url
from server.adapters.frozen_base import FrozenBase
from server.adapters.host_cache import HostCache
from server.adapters.packing import base_model_spec
from server.adapters.service import AdapterService
from server.config import parse_args
from server.scale.sync import RegistrySync
from server.tenancy.principal import Principal
from tests.live_server import wait_until
from tests.seaweed import BUCKET, seaweed_s3
from tests.test_tenancy import _lora


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweed_s3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def url(s3) -> str:
    return s3.url(f"t-{uuid.uuid4().hex[:8]}")  # a prefix of its own per test


def _files(seed: int, size: int = 64) -> dict[str, bytes]:
    return {"adapter_config.json": f'{{"seed": {seed}}}'.encode(), "adapter_model.safetensors": bytes([seed]) * size}


def _keys(url: str) -> list[str]:
    prefix = url.split("/", 3)[3]
    return sorted(o["Key"][len(prefix) + 1 :] for o in S3TenantStores(url)._s.list(prefix + "/"))


def test_an_s3_url_survives_config_parsing():
    config = parse_args(["--adapters-dir", "s3://bucket/some/prefix", "--s3-endpoint-url", "http://127.0.0.1:9"])
    assert config.adapters_dir == "s3://bucket/some/prefix" and config.s3_endpoint_url == "http://127.0.0.1:9"
    assert parse_args(["--adapters-dir", "/tmp/x"]).adapters_dir == Path("/tmp/x")
    assert parse_s3_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix") and parse_s3_url("s3://b") == ("b", "")


def test_publish_read_and_tenants_apart(url):
    stores = S3TenantStores(url)
    acme, globex = stores.store("acme"), stores.store("globex")
    v1 = acme.publish("my-lora", _files(1), {"info": {"n": 1}})
    v2 = globex.publish("my-lora", _files(2), {"info": {"n": 2}})  # same id, another owner
    assert v1 != v2
    assert acme.read("my-lora", v1) == _files(1) and acme.meta("my-lora", v1) == {"info": {"n": 1}}
    assert globex.read("my-lora", v2) == _files(2)
    with pytest.raises(AdapterNotFound):
        acme.read("my-lora", v2)  # another tenant's version is not under this tenant's keys
    assert stores.scan() == {AdapterRef("acme", "my-lora"): v1, AdapterRef("globex", "my-lora"): v2}
    keys = _keys(url)
    assert f"{POINTERS}/acme/my-lora" in keys and f"{POINTERS}/globex/my-lora" in keys
    assert all(k.startswith((f"{POINTERS}/", "_epoch", f"acme/my-lora/{v1}/", f"globex/my-lora/{v2}/")) for k in keys)

    # The public mark lives in the pointer: it survives a re-upload, and goes with a delete.
    acme.set_access("my-lora", {"public": True})
    v3 = acme.publish("my-lora", _files(3), {"info": {"n": 3}})
    assert acme.current("my-lora") == v3 and acme.access("my-lora") == {"public": True}
    assert acme.read("my-lora", v1) == _files(1)  # replaced, still readable until collected
    assert acme.publish("my-lora", _files(3), {"info": {"n": 4}}) == v3  # same content: nothing changes
    assert acme.versions("my-lora") == sorted([v1, v3])
    assert acme.delete("my-lora") and not acme.delete("my-lora")
    assert acme.current("my-lora") is None and acme.access("my-lora") == {}
    assert S3TenantStores(url).scan() == {AdapterRef("globex", "my-lora"): v2}  # a fresh reader agrees
    with pytest.raises(AdapterNotFound):
        acme.set_access("my-lora", {"public": True})


def test_a_stale_pointer_cannot_win(url):
    """Replica A read the pointer, replica B replaced it; A's conditional write must fail (409), not
    silently overwrite B's upload."""
    a, b = S3TenantStores(url).store("acme"), S3TenantStores(url).store("acme")
    ref = AdapterRef("acme", "x")
    a.publish("x", _files(1), {})
    stale = a._s.read_pointer(ref)
    v2 = b.publish("x", _files(2), {})
    with pytest.raises(StoreConflict):
        a._write_pointer(ref, stale, Pointer("0" * 16, "f" * 16, {}))
    with pytest.raises(StoreConflict):
        a._write_pointer(ref, None, Pointer("0" * 16, "f" * 16, {}))  # "create" when one exists
    assert a.current("x") == v2 and a.read("x", v2) == _files(2)


def _conditional_race(clients: list, key: str, etag: str, tag: str) -> list[int]:
    """Every client writes `key` conditional on `etag` at once; the indexes of those that won."""
    barrier = threading.Barrier(len(clients))
    wins: list[int] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            clients[i].put_object(Bucket=BUCKET, Key=key, Body=f"{tag} {i}".encode(), IfMatch=etag)
            wins.append(i)
        except ClientError as exc:
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] in (409, 412)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins


def test_the_server_makes_conditional_writes_atomic(url):
    """What the store relies on: of 8 concurrent writes conditional on one ETag, exactly one wins.
    (SeaweedFS 4.16 checked the condition before taking its lock and let several win: seaweedfs#8800.)"""
    clients = [make_client() for _ in range(8)]
    key = url.split("/", 3)[3] + "/race"
    for round_ in range(4):
        etag = clients[0].put_object(Bucket=BUCKET, Key=key, Body=f"start {round_}".encode())["ETag"]
        wins = _conditional_race(clients, key, etag, str(round_))
        assert len(wins) == 1, wins
        assert clients[0].get_object(Bucket=BUCKET, Key=key)["Body"].read() == f"{round_} {wins[0]}".encode()


def test_racing_uploads_of_one_id_never_both_win_silently(url):
    """Six replicas upload different content to one id at once: every upload either won (and its
    version was current when it returned) or got StoreConflict; the id ends on a winner's version."""
    replicas = [S3TenantStores(url).store("acme") for _ in range(6)]
    barrier = threading.Barrier(len(replicas))
    outcomes: dict[int, str | Exception] = {}

    def upload(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = replicas[i].publish("hot", _files(10 + i, 4096), {})
        except StoreConflict as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [v for v in outcomes.values() if isinstance(v, str)]
    assert len(outcomes) == 6 and won and all(isinstance(v, str | StoreConflict) for v in outcomes.values())
    final = replicas[0].current("hot")
    assert final in won and replicas[0].read("hot", final) is not None


KILLED_UPLOAD = textwrap.dedent(
    """
    import sys
    from adapters_store.s3 import S3TenantStores
    store = S3TenantStores(sys.argv[1]).store("acme")
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\\x07" * (48 << 20)}
    print("publishing", flush=True)
    store.publish("big", files, {})
    print("published", flush=True)
    """
)


def test_a_killed_upload_leaves_nothing_a_reader_picks_up(url, tmp_path):
    stores = S3TenantStores(url)
    v1 = stores.store("acme").publish("big", _files(1), {})
    proc = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "publishing"
    # Kill it once its upload prefix has objects in the bucket, before the pointer names them.
    wait_until(lambda: len({k.split("/")[3] for k in _keys(url) if k.startswith("acme/big/")}) > 1, 60, "a write")
    proc.kill()
    proc.wait()
    fresh = S3TenantStores(url)
    assert fresh.scan() == {AdapterRef("acme", "big"): v1}
    assert fresh.store("acme").read("big", v1) == _files(1)
    # The killed upload's objects are garbage: collected once unnamed for the grace period.
    collector = S3TenantStores(url, grace_s=0)
    assert collector.collect_garbage() == 1
    assert {k.split("/")[2] for k in _keys(url) if k.startswith("acme/big/")} == {v1}
    assert fresh.store("acme").read("big", v1) == _files(1)


def test_garbage_is_what_no_pointer_names_for_the_grace_period(url):
    stores = S3TenantStores(url)
    store = stores.store("acme")
    v1 = store.publish("a", _files(1), {})
    v2 = store.publish("a", _files(2), {})  # v1 replaced
    store.publish("b", _files(3), {})
    store.delete("b")  # b's only version unnamed
    patient = S3TenantStores(url, grace_s=3600)
    assert patient.collect_garbage() == 0  # first seen unnamed just now: kept for running requests
    assert store.read("a", v1) == _files(1)
    eager = S3TenantStores(url, grace_s=0)
    assert eager.collect_garbage() == 2
    assert store.versions("a") == [v2] and store.versions("b") == []
    with pytest.raises(AdapterNotFound):
        store.read("a", v1)
    assert store.read("a", v2) == _files(2) and eager.scan() == {AdapterRef("acme", "a"): v2}


# ---- two services over one bucket: replicas that agree (no Ray) -------------------------------------------
@pytest.fixture(scope="module")
def spec(tiny_served_model_dir):
    from server.model.loader import load_model

    model = load_model(tiny_served_model_dir, torch.float32, 64)
    linears = model.adapted_linears()
    return base_model_spec(linears, FrozenBase.capture(linears), 64, 1 << 24)


def _service(url: str, spec) -> tuple[AdapterService, RegistrySync]:
    service = AdapterService(S3TenantStores(url), AdapterRegistry(), HostCache(1 << 26), spec)
    service.recover()
    return service, RegistrySync(service).start()


def _within(seconds: float, predicate, what: str) -> float:
    started = time.monotonic()
    wait_until(predicate, seconds, what)
    return time.monotonic() - started


def _sees(service: AdapterService, name: str, caller: Principal, version: str | None) -> bool:
    try:
        return service.get(name, caller).version == version
    except AdapterNotFound:
        return version is None


def test_two_replicas_agree_within_two_seconds(url, spec):
    (a, sync_a), (b, sync_b) = _service(url, spec), _service(url, spec)
    acme, globex, admin = Principal("acme", "user"), Principal("globex", "user"), Principal("ops", "admin")
    try:
        v1 = a.upload("shared", *_lora(1), owner="acme").version
        assert _within(2, lambda: _sees(b, "shared", acme, v1), "b to see the upload") < 2
        assert not _sees(b, "acme/shared", globex, v1)  # private: another tenant sees nothing

        # b serves it cold from the bucket; its request holds v1 through a hot swap made on a.
        held = b.resolve_info("shared", acme)
        wait_until(lambda: b.cache.resident(v1), 10, "b's loader to bring v1 in from the store")
        assert b.cache.counts.loads == 1
        v2 = a.upload("shared", *_lora(2), owner="acme").version
        _within(2, lambda: _sees(b, "shared", acme, v2), "b to see the hot swap")
        assert b.cache.resident(held.version) and b.cache.is_discarded(v1)  # kept for the running request
        b.cache.release(held.version)
        assert not b.cache.resident(v1)

        # The public mark and a delete, made on b, reach a.
        b.set_public("acme/shared", True, admin)
        _within(2, lambda: _sees(a, "acme/shared", globex, v2), "a to see the public mark")
        b.delete("shared", acme)
        _within(2, lambda: _sees(a, "shared", acme, None), "a to see the delete")

    finally:
        sync_a.stop()
        sync_b.stop()
