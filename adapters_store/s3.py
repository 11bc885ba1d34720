"""The adapter store on S3-compatible object storage (`--adapters-dir s3://bucket/prefix`), shared by
every replica of a deployment. Same surface as `TenantStores` / `AdapterStore` (store.py, tenants.py).

Layout under ``s3://<bucket>/<prefix>/``::

    <tenant>/<adapter_id>/<version>/<upload>/adapter_config.json, adapter_model.safetensors, meta.json
    <tenant>/<adapter_id>/<version>/<upload>/manifest.json   # written last: the upload is complete
    _current/<tenant>/<adapter_id>    # the pointer {"version", "upload", "access"}, conditional writes only
    _epoch                            # rewritten after every pointer change

Versions are content digests (store.py's ``content_version``). Each publish writes its files under a
prefix of its own (the version plus a random upload token) that no reader looks at until a pointer
names it, and never writes to it again. The pointer is the only object ever replaced, and only with
a conditional write on the ETag it was read with (``If-None-Match: *`` when there was none): of two
uploads racing on one id exactly one wins, the other gets `StoreConflict` (409) and nothing of it is
visible. A killed upload leaves an upload prefix no pointer names: garbage.

Garbage (upload prefixes no pointer names: killed or lost uploads, replaced and deleted versions) is
removed by `S3TenantStores.collect_garbage` once this process has seen it unnamed for ``grace_s``.
Another replica may still be about to read a version it resolved just before the pointer moved on
(its registry lags by one refresh, then the load waits its turn), so nothing is deleted at once; a
publish that could not write its pointer within ``grace_s / 2`` of starting gives up, so a prefix
that a publish is still writing is never collected under it. `remove_version` therefore has nothing
to do here.

Pointers live together under ``_current/`` so that a replica's refresh lists one small key per
adapter, not every file of every version (listing 5,000 keys takes ~0.8 s on SeaweedFS on the
2-core dev VM); and it lists them only when ``_epoch`` changed, or every ``full_refresh_s``
(a writer killed between its pointer and its epoch write delays that change until then).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from .errors import AdapterError, AdapterNotFound, StoreConflict, StoreCorrupted
from .store import _FILE_RE, _RESERVED_FILES, _VERSION_RE, _check_version, content_version, validate_adapter_id
from .tenants import AdapterRef, validate_tenant

log = logging.getLogger(__name__)

SCHEME = "s3://"
POINTERS = "_current"  # not a valid tenant name (leading "_"), so it never collides with one
EPOCH = "_epoch"
MANIFEST = "manifest.json"
META = "meta.json"
GRACE_S = 600.0  # how long an unnamed upload prefix is kept (see the module docstring)
FULL_REFRESH_S = 30.0  # pointers are listed at least this often, epoch or not
GC_INTERVAL_S = 60.0
_UPLOAD_LEN = 16  # hex characters of an upload token


def is_s3_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ("bucket", "some/prefix")."""
    if not is_s3_url(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    return bucket, prefix.strip("/")


def make_client(endpoint_url: str | None = None):
    """A boto3 S3 client. Credentials, region and (when not given) the endpoint come from the usual
    AWS sources: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
    AWS_REGION, AWS_ENDPOINT_URL(_S3), instance roles. A custom endpoint (SeaweedFS, MinIO) is
    addressed path-style, which they all serve."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        max_pool_connections=32,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(exc: ClientError) -> bool:
    return _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound")


def _lost_race(exc: ClientError) -> bool:
    # 412: the ETag no longer matches; 409: S3 saw another conditional write to the key in flight.
    return _status(exc) in (409, 412) or _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict")


@dataclass(frozen=True, slots=True)
class Pointer:
    """An adapter id's current version, which upload prefix holds it, and who else may use it."""

    version: str
    upload: str
    access: dict[str, Any]
    etag: str = ""  # of the pointer object it was read from or written as

    def body(self) -> bytes:
        return json.dumps({"version": self.version, "upload": self.upload, "access": self.access}).encode()

    @classmethod
    def parse(cls, data: bytes, etag: str) -> Pointer:
        try:
            d = json.loads(data)
            version, upload, access = d["version"], d["upload"], d.get("access") or {}
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreCorrupted(f"unreadable pointer: {exc}") from exc
        if not (isinstance(version, str) and _VERSION_RE.match(version)) or not isinstance(upload, str):
            raise StoreCorrupted(f"pointer names no valid version: {d!r}")
        return cls(version, upload, access if isinstance(access, dict) else {}, etag)


@dataclass(slots=True)
class _Shared:
    """What every tenant's store of one bucket/prefix shares: the client and the pointers as last seen."""

    client: Any
    bucket: str
    prefix: str
    grace_s: float
    pool: ThreadPoolExecutor
    lock: threading.Lock = field(default_factory=threading.Lock)
    pointers: dict[AdapterRef, Pointer] = field(default_factory=dict)  # guarded by lock

    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts) if self.prefix else parts)

    def rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def get(self, key: str) -> tuple[bytes, str] | None:
        """(body, etag), or None when the key does not exist."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def put(self, key: str, data: bytes, **conditions: str) -> str:
        return self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **conditions)["ETag"]

    def list(self, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", ())

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def bump_epoch(self) -> None:
        self.put(self.key(EPOCH), secrets.token_bytes(8))

    def read_pointer(self, ref: AdapterRef) -> Pointer | None:
        """The pointer as stored now (and remembered)."""
        found = self.get(self.key(POINTERS, ref.tenant, ref.adapter_id))
        pointer = None if found is None else Pointer.parse(*found)
        self.remember(ref, pointer)
        return pointer

    def remember(self, ref: AdapterRef, pointer: Pointer | None) -> None:
        with self.lock:
            if pointer is None:
                self.pointers.pop(ref, None)
            else:
                self.pointers[ref] = pointer

    def cached(self, ref: AdapterRef) -> Pointer | None:
        with self.lock:
            return self.pointers.get(ref)


class S3AdapterStore:
    """One tenant's adapters in the bucket: `AdapterStore`'s methods (store.py), with the differences
    a shared store needs (`remove_version` defers to garbage collection; `access` answers from the
    pointer as last read, at most one refresh old)."""

    def __init__(self, shared: _Shared, tenant: str) -> None:
        self._s = shared
        self.tenant = validate_tenant(tenant)
        self.root = f"{SCHEME}{shared.bucket}/{shared.key(tenant)}"  # for messages and logs

    def _ref(self, adapter_id: str) -> AdapterRef:
        return AdapterRef(self.tenant, validate_adapter_id(adapter_id))

    def _data_key(self, adapter_id: str, version: str, upload: str, name: str) -> str:
        return self._s.key(self.tenant, adapter_id, version, upload, name)

    # ---- writes ---------------------------------------------------------------------------------
    def publish(self, adapter_id: str, files: dict[str, bytes], meta: dict[str, Any], prewritten: None = None) -> str:
        """Store files + meta under a new upload prefix, then point the id at them with a conditional
        write; returns the content version. Raises StoreConflict when another upload of the id
        changed its pointer meanwhile (nothing of this one is visible then)."""
        ref = self._ref(adapter_id)
        for name in files:
            if not _FILE_RE.match(name) or name in _RESERVED_FILES:
                raise ValueError(f"invalid stored file name {name!r}")
        meta_bytes = json.dumps(meta, sort_keys=True, indent=1).encode()
        started = time.monotonic()
        digests = dict(zip(files, self._s.pool.map(_sha256, files.values()), strict=True))
        version = content_version(files, digests)
        previous = self._s.read_pointer(ref)
        if previous is not None and previous.version == version:
            return version  # this very content is current already
        upload = secrets.token_hex(_UPLOAD_LEN // 2)
        manifest = {
            "version": version,
            "files": {name: {"size": len(data), "sha256": digests[name]} for name, data in files.items()},
        }
        objects = {**files, META: meta_bytes}
        keys = {name: self._data_key(adapter_id, version, upload, name) for name in objects}
        list(self._s.pool.map(lambda name: self._s.put(keys[name], objects[name]), objects))
        self._s.put(self._data_key(adapter_id, version, upload, MANIFEST), json.dumps(manifest, indent=1).encode())
        if time.monotonic() - started > self._s.grace_s / 2:
            # Garbage collection may already count this prefix as abandoned: do not name it.
            raise StoreConflict(f"publishing {ref} took longer than {self._s.grace_s / 2:.0f}s; retry")
        access = previous.access if previous is not None else {}
        self._write_pointer(ref, previous, Pointer(version, upload, access))
        return version

    def _write_pointer(self, ref: AdapterRef, previous: Pointer | None, new: Pointer) -> None:
        key = self._s.key(POINTERS, ref.tenant, ref.adapter_id)
        condition = {"IfMatch": previous.etag} if previous is not None else {"IfNoneMatch": "*"}
        try:
            etag = self._s.put(key, new.body(), **condition)
        except ClientError as exc:
            if not _lost_race(exc):
                raise
            now = self._s.read_pointer(ref)
            if now is None or (now.version, now.upload, now.access) != (new.version, new.upload, new.access):
                raise StoreConflict(
                    f"adapter {ref} was changed by another writer while this change was being stored; "
                    "nothing of this change is visible; retry"
                ) from None
            etag = now.etag  # our own write, whose first response was lost and was retried
        self._s.remember(ref, Pointer(new.version, new.upload, new.access, etag))
        self._s.bump_epoch()

    def delete(self, adapter_id: str) -> bool:
        """Remove the id's pointer; its files become garbage (kept ``grace_s`` for running requests)."""
        ref = self._ref(adapter_id)
        if self._s.read_pointer(ref) is None:
            return False
        self._s.client.delete_object(Bucket=self._s.bucket, Key=self._s.key(POINTERS, ref.tenant, adapter_id))
        self._s.remember(ref, None)
        self._s.bump_epoch()
        return True

    def remove_version(self, adapter_id: str, version: str) -> None:
        """Nothing now: a version no pointer names is removed by garbage collection after grace_s,
        since other replicas may still be about to read it."""
        validate_adapter_id(adapter_id)
        _check_version(version)

    def set_access(self, adapter_id: str, access: dict[str, Any]) -> None:
        """Replace the id's access settings (kept in its pointer, so they survive re-uploads)."""
        ref = self._ref(adapter_id)
        for _ in range(8):  # lost races with uploads of the id: read again and retry
            current = self._s.read_pointer(ref)
            if current is None:
                raise AdapterNotFound(f"unknown adapter {adapter_id!r}")
            try:
                self._write_pointer(ref, current, Pointer(current.version, current.upload, dict(access)))
                return
            except StoreConflict:
                continue
        raise StoreConflict(f"adapter {ref} keeps changing; retry")

    # ---- reads ----------------------------------------------------------------------------------
    def current(self, adapter_id: str) -> str | None:
        pointer = self._s.read_pointer(self._ref(adapter_id))
        return None if pointer is None else pointer.version

    def access(self, adapter_id: str) -> dict[str, Any]:
        ref = self._ref(adapter_id)
        pointer = self._s.cached(ref) or self._s.read_pointer(ref)
        return {} if pointer is None else dict(pointer.access)

    def read(self, adapter_id: str, version: str) -> dict[str, bytes]:
        """The stored files (without meta/manifest), checked against the manifest's sha256."""
        upload = self._upload_of(adapter_id, version)
        manifest = self._json(adapter_id, version, upload, MANIFEST)
        try:
            names = {name: (e["size"], e["sha256"]) for name, e in manifest["files"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise StoreCorrupted(f"{self.tenant}/{adapter_id}/{version}: bad manifest: {exc}") from exc
        keys = [self._data_key(adapter_id, version, upload, name) for name in names]
        bodies = list(self._s.pool.map(self._s.get, keys))
        out = {}
        for (name, (size, sha)), found in zip(names.items(), bodies, strict=True):
            if found is None or len(found[0]) != size or _sha256(found[0]) != sha:
                raise StoreCorrupted(f"{self.tenant}/{adapter_id}/{version}/{name}: missing or not as in its manifest")
            out[name] = found[0]
        return out

    def meta(self, adapter_id: str, version: str) -> dict[str, Any]:
        return self._json(adapter_id, version, self._upload_of(adapter_id, version), META)

    def versions(self, adapter_id: str) -> list[str]:
        """Versions of the id with a complete upload (the current one, and garbage not collected yet)."""
        validate_adapter_id(adapter_id)
        return sorted({version for version, _upload in self._complete_uploads(adapter_id)})

    def scan(self) -> dict[str, str]:
        """{adapter_id: current version} of this tenant, as stored now."""
        found = {}
        for obj in self._s.list(self._s.key(POINTERS, self.tenant) + "/"):
            adapter_id = obj["Key"].rsplit("/", 1)[-1]
            try:
                pointer = self._s.read_pointer(self._ref(adapter_id))
            except AdapterError:  # not an id (never touched), or an unreadable pointer
                continue
            if pointer is not None:
                found[adapter_id] = pointer.version
        return found

    # ---- helpers --------------------------------------------------------------------------------
    def _complete_uploads(self, adapter_id: str, version: str = "") -> list[tuple[str, str]]:
        """(version, upload) of the id's uploads whose manifest is stored, newest first."""
        base = self._s.key(self.tenant, adapter_id) + "/"
        found = []
        for obj in self._s.list(base + (f"{version}/" if version else "")):
            parts = obj["Key"][len(base) :].split("/")
            if len(parts) == 3 and parts[2] == MANIFEST and _VERSION_RE.match(parts[0]):
                found.append((obj["LastModified"], parts[0], parts[1]))
        return [(v, u) for _, v, u in sorted(found, reverse=True)]

    def _upload_of(self, adapter_id: str, version: str) -> str:
        """The upload prefix holding `version`: the pointer's when it names it, else any complete one
        (a version replaced a moment ago that a running request still has to load)."""
        ref = self._ref(adapter_id)
        _check_version(version)
        pointer = self._s.cached(ref)
        if pointer is not None and pointer.version == version:
            return pointer.upload
        uploads = self._complete_uploads(adapter_id, version)
        if not uploads:
            raise AdapterNotFound(f"adapter {adapter_id!r} has no version {version}")
        return uploads[0][1]

    def _json(self, adapter_id: str, version: str, upload: str, name: str) -> Any:
        found = self._s.get(self._data_key(adapter_id, version, upload, name))
        if found is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} version {version}: {name} is gone")
        try:
            return json.loads(found[0])
        except ValueError as exc:
            raise StoreCorrupted(f"{self.tenant}/{adapter_id}/{version}/{name} unreadable: {exc}") from exc


def _sha256(data: bytes) -> str:
    h = hashlib.sha256()
    h.update(data)  # releases the GIL on large buffers
    return h.hexdigest()


class S3TenantStores:
    """Every tenant's store in one bucket/prefix: `TenantStores`' surface (tenants.py)."""

    shared = True  # other processes write here too: the registry must be refreshed from it

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        grace_s: float = GRACE_S,
        full_refresh_s: float = FULL_REFRESH_S,
        gc_interval_s: float = GC_INTERVAL_S,
        client: Any = None,
    ) -> None:
        self.url = url
        bucket, prefix = parse_s3_url(url)
        self._s = _Shared(client or make_client(endpoint_url), bucket, prefix, grace_s, ThreadPoolExecutor(16))
        self.full_refresh_s = full_refresh_s
        self.gc_interval_s = gc_interval_s
        self._lock = threading.Lock()
        self._stores: dict[str, S3AdapterStore] = {}
        self._epoch: str | None = None  # ETag of _epoch when the pointers were last listed
        self._listed_at = -float("inf")
        self._gc_at = -float("inf")
        self._unnamed_since: dict[str, float] = {}  # upload prefix -> when first seen unnamed
        self._ensure_bucket()

    def __str__(self) -> str:
        return self.url

    def _ensure_bucket(self) -> None:
        try:
            self._s.client.head_bucket(Bucket=self._s.bucket)
        except ClientError as exc:
            if not _missing(exc):
                raise
            log.warning("bucket %s does not exist: creating it", self._s.bucket)
            try:
                self._s.client.create_bucket(Bucket=self._s.bucket)
            except ClientError as exc:
                if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise  # (another replica starting at the same time created it: fine)

    def store(self, tenant: str) -> S3AdapterStore:
        validate_tenant(tenant)
        with self._lock:
            store = self._stores.get(tenant)
            if store is None:
                store = self._stores[tenant] = S3AdapterStore(self._s, tenant)
            return store

    def scan(self) -> dict[AdapterRef, str]:
        """{ref: current version} of every tenant, as stored now: the pointers are listed again when
        the epoch changed (or every full_refresh_s), and only changed ones are read. Garbage is
        collected every gc_interval_s."""
        self.refresh_pointers()
        if time.monotonic() - self._gc_at >= self.gc_interval_s:
            try:
                self.collect_garbage()
            except ClientError as exc:  # garbage can wait for the next round
                log.warning("garbage collection in %s failed: %s", self.url, exc)
        with self._s.lock:
            return {ref: p.version for ref, p in self._s.pointers.items()}

    def refresh_pointers(self, force: bool = False) -> bool:
        """Bring the remembered pointers in step with the bucket; True when they were listed."""
        try:
            epoch = self._s.client.head_object(Bucket=self._s.bucket, Key=self._s.key(EPOCH))["ETag"]
        except ClientError as exc:
            if not _missing(exc):
                raise
            epoch = None
        if not force and epoch == self._epoch and time.monotonic() - self._listed_at < self.full_refresh_s:
            return False
        listed_at = time.monotonic()
        seen: dict[AdapterRef, str] = {}
        for obj in self._s.list(self._s.key(POINTERS) + "/"):
            parts = self._s.rel(obj["Key"]).split("/")
            if len(parts) != 3:
                continue
            try:
                seen[AdapterRef(validate_tenant(parts[1]), validate_adapter_id(parts[2]))] = obj["ETag"]
            except (ValueError, AdapterError):  # not a name of ours: ignored
                continue
        with self._s.lock:
            changed = [ref for ref, etag in seen.items() if (p := self._s.pointers.get(ref)) is None or p.etag != etag]
            for ref in [ref for ref in self._s.pointers if ref not in seen]:
                del self._s.pointers[ref]
        for ref, outcome in zip(changed, self._s.pool.map(self._try_read_pointer, changed), strict=True):
            if isinstance(outcome, Exception):
                log.warning("pointer of %s unreadable, skipped: %s", ref, outcome)
        self._epoch, self._listed_at = epoch, listed_at
        return True

    def _try_read_pointer(self, ref: AdapterRef) -> Pointer | None | Exception:
        try:
            return self._s.read_pointer(ref)
        except (StoreCorrupted, ClientError) as exc:
            self._s.remember(ref, None)
            return exc

    def collect_garbage(self) -> int:
        """Delete upload prefixes that no pointer has named for grace_s (as this process saw it);
        returns how many were deleted. The manifest goes first, so a half-deleted prefix reads as
        incomplete."""
        self._gc_at = time.monotonic()
        self.refresh_pointers(force=True)
        with self._s.lock:
            named = {self._s.key(r.tenant, r.adapter_id, p.version, p.upload) for r, p in self._s.pointers.items()}
        uploads: dict[str, list[str]] = {}
        for obj in self._s.list(self._s.key("")):
            parts = self._s.rel(obj["Key"]).split("/")
            if len(parts) != 5 or not _VERSION_RE.match(parts[2]) or parts[0].startswith("_"):
                continue  # not an upload's file: never touched
            uploads.setdefault("/".join(obj["Key"].split("/")[:-1]), []).append(obj["Key"])
        now = time.monotonic()
        self._unnamed_since = {k: t for k, t in self._unnamed_since.items() if k in uploads and k not in named}
        deleted = 0
        for prefix, keys in uploads.items():
            if prefix in named:
                continue
            if now - self._unnamed_since.setdefault(prefix, now) < self._s.grace_s:
                continue
            manifest = [k for k in keys if k.endswith("/" + MANIFEST)]
            self._s.delete(manifest)
            self._s.delete([k for k in keys if k not in manifest])
            del self._unnamed_since[prefix]
            deleted += 1
        if deleted:
            log.info("garbage collection in %s: %d unnamed uploads deleted", self.url, deleted)
        return deleted
