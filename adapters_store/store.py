"""Crash-safe, versioned on-disk adapter store.

Layout::

    <root>/<adapter_id>/CURRENT              # text: the current version (16 hex chars)
    <root>/<adapter_id>/<version>/adapter_config.json
    <root>/<adapter_id>/<version>/adapter_model.safetensors
    <root>/<adapter_id>/<version>/meta.json      # caller's metadata
    <root>/<adapter_id>/<version>/manifest.json  # {file: {size, sha256}} used by scan()/read()
    <root>/.tmp-*                            # in-flight writes; always garbage after a restart

Invariants: a version directory appears only via os.replace of a fully written and fsynced temp
directory, and CURRENT is only ever replaced atomically. A crash therefore leaves either the old
state or the new state plus garbage that ``scan()`` removes (temp dirs, versions CURRENT does not
name). A publish is acknowledged only after CURRENT names the new version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any

from .errors import AdapterNotFound, InvalidAdapterId, StoreConflict, StoreCorrupted

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED_FILES = {"meta.json", "manifest.json"}
CURRENT = "CURRENT"
TMP_PREFIX = ".tmp-"
# Names the store writes itself, refused as adapter ids whatever their case (case-insensitive file
# systems, and no id should read like the store's own bookkeeping).
RESERVED_IDS = frozenset(n.casefold() for n in (CURRENT, *_RESERVED_FILES))


def validate_adapter_id(adapter_id: str) -> str:
    # The regex already forbids "/", NUL and a leading dot; ".."-containing ids are rejected
    # anyway so no id can ever look like a path component trick (e.g. "a..b" is harmless, but we
    # keep the rule simple and obvious).
    if not isinstance(adapter_id, str) or not _ID_RE.match(adapter_id) or ".." in adapter_id:
        raise InvalidAdapterId(
            f"invalid adapter id {adapter_id!r}: must match {_ID_RE.pattern} and not contain '..'"
        )
    if adapter_id.casefold() in RESERVED_IDS:
        raise InvalidAdapterId(f"adapter id {adapter_id!r} is reserved: the store uses that name itself "
                               f"(reserved, any case: {', '.join(sorted(RESERVED_IDS))})")
    return adapter_id


def _is_adapter_id(name: str) -> bool:
    try:
        validate_adapter_id(name)
    except InvalidAdapterId:
        return False
    return True


def _check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise AdapterNotFound(f"invalid version {version!r}")
    return version


def file_digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def content_version(files: dict[str, bytes], digests: dict[str, str] | None = None) -> str:
    """First 16 hex of sha256 over (name, length, sha256) of every file, in sorted name order.

    Built from per-file digests so publishing hashes each (multi-MB) file once.
    """
    digests = digests or file_digests(files)
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "little") + bytes.fromhex(digests[name]))
    return h.hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # serialises mutations within this process

    # ------------------------------------------------------------------ helpers
    def _tmp_path(self) -> Path:
        return self.root / f"{TMP_PREFIX}{secrets.token_hex(8)}"

    def _version_ok(self, vdir: Path) -> bool:
        """Complete = manifest readable and every listed file present with the right size."""
        try:
            manifest = json.loads((vdir / "manifest.json").read_bytes())
            if not (vdir / "meta.json").is_file():
                return False
            return all((vdir / n).stat().st_size == e["size"] for n, e in manifest["files"].items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def current(self, adapter_id: str) -> str | None:
        validate_adapter_id(adapter_id)
        try:
            v = (self.root / adapter_id / CURRENT).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return v if _VERSION_RE.match(v) else None

    def _write_current(self, adapter_id: str, version: str) -> None:
        tmp = self._tmp_path()
        _write_file(tmp, (version + "\n").encode())
        try:
            os.replace(tmp, self.root / adapter_id / CURRENT)
        except BaseException:
            _rmtree(tmp)
            raise
        _fsync_dir(self.root / adapter_id)

    # ------------------------------------------------------------------ API
    def publish(self, adapter_id: str, files: dict[str, bytes], meta: dict[str, Any]) -> str:
        """Store files + meta and make them current; returns the content version."""
        validate_adapter_id(adapter_id)
        for name in files:
            if not _FILE_RE.match(name) or name in _RESERVED_FILES:
                raise ValueError(f"invalid stored file name {name!r}")
        digests = file_digests(files)
        version = content_version(files, digests)
        meta_bytes = json.dumps(meta, sort_keys=True, indent=1).encode()  # fail before touching disk
        with self._lock:
            adir = self.root / adapter_id
            vdir = adir / version
            created_adir = created_vdir = False
            previous = self.current(adapter_id)
            try:
                if not self._version_ok(vdir):
                    _rmtree(vdir)  # incomplete leftovers (cannot happen via this code; be safe)
                    tmp = self._tmp_path()
                    tmp.mkdir()
                    try:
                        manifest = {"version": version, "files": {}}
                        for name, data in files.items():
                            _write_file(tmp / name, data)
                            manifest["files"][name] = {
                                "size": len(data), "sha256": digests[name]}
                        _write_file(tmp / "meta.json", meta_bytes)
                        _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
                        _fsync_dir(tmp)
                        if not adir.exists():
                            adir.mkdir()
                            created_adir = True
                            _fsync_dir(self.root)
                        os.replace(tmp, vdir)
                        created_vdir = True
                    finally:
                        _rmtree(tmp)  # no-op once renamed
                    _fsync_dir(adir)
                if previous != version:
                    self._write_current(adapter_id, version)
            except BaseException:
                # Roll back what this call created so a failed publish leaves the store unchanged.
                # (A real crash skips this; scan() then removes the same leftovers.)
                if created_vdir:
                    _rmtree(vdir)
                if created_adir:
                    _rmtree(adir)
                raise
            return version

    def remove_version(self, adapter_id: str, version: str) -> None:
        """Delete a non-current version (the server calls this once no request uses it)."""
        validate_adapter_id(adapter_id)
        _check_version(version)
        with self._lock:
            if self.current(adapter_id) == version:
                raise StoreConflict(f"version {version} is the current version of {adapter_id!r}")
            vdir = self.root / adapter_id / version
            if not vdir.exists():
                return
            # Rename first so a crash mid-rmtree leaves only a .tmp-* that scan() removes.
            tmp = self._tmp_path()
            os.replace(vdir, tmp)
            _fsync_dir(self.root / adapter_id)
            _rmtree(tmp)

    def delete(self, adapter_id: str) -> bool:
        """Remove an adapter. CURRENT goes first, so a crash leaves an unpublished dir for scan()."""
        validate_adapter_id(adapter_id)
        with self._lock:
            adir = self.root / adapter_id
            if not adir.is_dir():
                return False
            try:
                os.unlink(adir / CURRENT)
            except FileNotFoundError:
                pass
            _fsync_dir(adir)
            tmp = self._tmp_path()
            os.replace(adir, tmp)
            _fsync_dir(self.root)
            _rmtree(tmp)
            return True

    def scan(self) -> dict[str, str]:
        """Startup recovery: returns {adapter_id: current version} and removes garbage.

        Removed: ``.tmp-*`` entries, adapter dirs without a valid CURRENT (publish or delete was
        interrupted) or whose current version is incomplete, and every entry inside an adapter dir
        other than CURRENT and the current version. Root entries that are not adapter ids are left
        alone (we never delete what we do not recognise at the top level).
        """
        found: dict[str, str] = {}
        with self._lock:
            for entry in sorted(self.root.iterdir()):
                name = entry.name
                if name.startswith(TMP_PREFIX):
                    _rmtree(entry)
                    continue
                if not _is_adapter_id(name) or not entry.is_dir() or entry.is_symlink():
                    continue
                version = self.current(name)
                if version is None or not self._version_ok(entry / version):
                    _rmtree(entry)
                    continue
                for child in entry.iterdir():
                    if child.name not in (CURRENT, version):
                        _rmtree(child)
                found[name] = version
            _fsync_dir(self.root)
        return found

    def read(self, adapter_id: str, version: str) -> dict[str, bytes]:
        """The stored files (without meta/manifest), checked against the manifest's sha256."""
        vdir = self._vdir(adapter_id, version)
        try:
            manifest = json.loads((vdir / "manifest.json").read_bytes())
            out = {n: (vdir / n).read_bytes() for n in manifest["files"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreCorrupted(f"{adapter_id}/{version}: unreadable: {exc}") from exc
        for n, data in out.items():
            if hashlib.sha256(data).hexdigest() != manifest["files"][n]["sha256"]:
                raise StoreCorrupted(f"{adapter_id}/{version}/{n}: sha256 mismatch")
        return out

    def meta(self, adapter_id: str, version: str) -> dict[str, Any]:
        vdir = self._vdir(adapter_id, version)
        try:
            return json.loads((vdir / "meta.json").read_bytes())
        except (OSError, ValueError) as exc:
            raise StoreCorrupted(f"{adapter_id}/{version}: meta.json unreadable: {exc}") from exc

    def versions(self, adapter_id: str) -> list[str]:
        validate_adapter_id(adapter_id)
        adir = self.root / adapter_id
        if not adir.is_dir():
            return []
        return sorted(p.name for p in adir.iterdir() if _VERSION_RE.match(p.name) and p.is_dir())

    def _vdir(self, adapter_id: str, version: str) -> Path:
        validate_adapter_id(adapter_id)
        _check_version(version)
        vdir = self.root / adapter_id / version
        if not vdir.is_dir():
            raise AdapterNotFound(f"adapter {adapter_id!r} has no version {version}")
        return vdir
