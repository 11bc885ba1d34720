"""Domain errors. `server.app` maps each to one HTTP status in a single place."""

from __future__ import annotations


class ServerError(Exception):
    """Base class; `status` and `error_type` decide the HTTP answer."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServerError):
    status = 400
    error_type = "invalid_request"


class ModelLoadError(ServerError):
    """Raised at startup when the checkpoint cannot be served; never reaches a client."""

    status = 500
    error_type = "model_load_error"
