"""API keys: a JSON file that maps the SHA-256 digest of each key to its tenant and role.

    {"<sha256 hex of the key>": {"tenant": "acme", "role": "user"}, ...}

The file never holds a key itself, so reading it (or a backup of it) gives no access. A key is shown
once, when `python -m server keys add` makes it. Lookup hashes the presented key and compares it with
every stored digest in constant time (`hmac.compare_digest`), so the time an answer takes does not
say how much of a digest matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from server.tenancy.principal import ROLES, Principal, validate_tenant

KEY_PREFIX = "sk-"  # what the OpenAI SDK and its users expect a key to look like


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyFileError(ValueError):
    """The keys file cannot be used (unreadable, not the documented shape)."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    entries: tuple[tuple[bytes, Principal], ...]  # (digest as bytes, who it is)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise KeyFileError(f"keys file {path} does not exist (make one: python -m server keys add)") from None
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"keys file {path} is unreadable: {exc}") from None
        return cls.from_mapping(raw, str(path))

    @classmethod
    def from_mapping(cls, raw: object, source: str = "keys") -> KeyRing:
        if not isinstance(raw, dict):
            raise KeyFileError(f"{source}: expected a JSON object of sha256 digest -> {{tenant, role}}")
        entries = []
        for digest, entry in raw.items():
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise KeyFileError(f"{source}: {digest!r} is not a lowercase sha256 hex digest")
            if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str):
                raise KeyFileError(f"{source}: entry {digest[:12]}... needs a string 'tenant'")
            role = entry.get("role", "user")
            if role not in ROLES:
                raise KeyFileError(f"{source}: entry {digest[:12]}... has role {role!r}; roles are {ROLES}")
            try:
                tenant = validate_tenant(entry["tenant"])
            except ValueError as exc:
                raise KeyFileError(f"{source}: {exc}") from None
            entries.append((bytes.fromhex(digest), Principal(tenant, role)))
        return cls(tuple(entries))

    def __len__(self) -> int:
        return len(self.entries)

    def authenticate(self, key: str) -> Principal | None:
        """Who holds `key`, or None. Every digest is compared, matched or not (constant time)."""
        presented = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for digest, principal in self.entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found


def add_key(path: Path, tenant: str, role: str = "user") -> str:
    """Make a random key for `tenant`, store its digest in `path` (created if missing, replaced
    atomically) and return the key: the only time it exists outside its holder's hands."""
    validate_tenant(tenant)
    if role not in ROLES:
        raise KeyFileError(f"role must be one of {ROLES}, not {role!r}")
    path = Path(path)
    raw = json.loads(path.read_text()) if path.exists() else {}
    KeyRing.from_mapping(raw, str(path))  # refuse to extend a file the server could not read
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    raw[key_digest(key)] = {"tenant": tenant, "role": role}
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(raw, out, indent=1, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return key
