"""`python -m server keys add --file FILE --tenant T [--role R]`: make an API key, store its digest,
print the key once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.tenancy.keys import KeyFileError, add_key
from server.tenancy.principal import ROLES


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m server keys", description="Manage API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="make a random key for a tenant; prints it once")
    add.add_argument("--file", type=Path, required=True, help="the keys file (created if missing)")
    add.add_argument("--tenant", required=True, help="the tenant the key acts for")
    add.add_argument("--role", choices=ROLES, default="user", help="admin sees every tenant's adapters")
    args = parser.parse_args(argv)
    try:
        key = add_key(args.file, args.tenant, args.role)
    except (KeyFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(f"(key for tenant {args.tenant!r}, role {args.role}; only its digest is in {args.file})", file=sys.stderr)
    return 0
