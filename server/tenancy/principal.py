"""The caller of a request: the tenant it acts for and its role."""

from __future__ import annotations

from dataclasses import dataclass

from adapters_store.tenants import DEFAULT_TENANT, validate_tenant

ROLES = ("admin", "user")
__all__ = ["DEFAULT_TENANT", "OPERATOR", "ROLES", "Principal", "validate_tenant"]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    role: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


OPERATOR = Principal(DEFAULT_TENANT, "admin")
"""The caller of a server without keys, and of in-process code (tests, benchmarks, the CLI)."""
