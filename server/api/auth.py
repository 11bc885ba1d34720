"""Who is calling: the `caller` dependency of every route but /health.

With API keys configured, a request must carry `Authorization: Bearer <key>` (what the OpenAI SDK
sends) with a key the keys file knows, else 401. Without keys every caller is `OPERATOR`: the
default tenant, with the admin role (the server said so at startup).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.errors import Forbidden, Unauthorized
from server.runtime import Runtime
from server.tenancy.principal import OPERATOR, Principal


async def caller(request: Request) -> Principal:
    runtime: Runtime = request.app.state.runtime
    if runtime.keys is None:
        return OPERATOR
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("this server needs an API key: send the header 'Authorization: Bearer <key>'")
    principal = runtime.keys.authenticate(key)
    if principal is None:
        raise Unauthorized("invalid API key")
    return principal


async def admin(request: Request) -> Principal:
    """`caller`, who must have the admin role (403 otherwise)."""
    principal = await caller(request)
    if not principal.is_admin:
        raise Forbidden("this route needs an admin key")
    return principal


Caller = Annotated[Principal, Depends(caller)]
"""A route parameter typed `Caller` receives the authenticated caller."""
Admin = Annotated[Principal, Depends(admin)]
