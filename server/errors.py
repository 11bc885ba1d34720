"""Domain errors. `server.app` maps each to one HTTP status in a single place."""

from __future__ import annotations


class ServerError(Exception):
    """Base class; `status` and `error_type` decide the HTTP answer."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ServerError):
    status = 400
    error_type = "invalid_request"


class InvalidField(InvalidRequest):
    """An invalid request caused by one field of the body, which `param` names (OpenAI's error
    envelope carries it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(ServerError):
    """Raised at startup when the checkpoint cannot be served; never reaches a client."""

    status = 500
    error_type = "model_load_error"


class Unauthorized(ServerError):
    """No API key, or one the server does not know (only when keys are configured)."""

    status = 401
    error_type = "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServerError):
    """The caller may see the thing but not do this to it (e.g. a user marking an adapter public)."""

    status = 403
    error_type = "permission_denied"


class LimitExceeded(ServerError):
    """A per-tenant quota or a server-wide limit is reached; `limit` names it, `retry_after` says
    when trying again may help (seconds)."""

    status = 429
    error_type = "limit_exceeded"

    def __init__(self, limit: str, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
