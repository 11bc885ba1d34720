"""What the OpenAPI document says about error answers, so clients see every status a route returns."""

from __future__ import annotations

from typing import Any

from server.api.schemas import ErrorResponse

_MEANING = {
    400: "Bad input: undecodable JSON or text, a prompt or max_tokens that cannot fit the context",
    401: "No API key, or an unknown one (only when the server has keys)",
    403: "A cross-site browser write (an Origin that --cors-allow-origins does not list), or a change the "
    "caller's role may not make",
    404: "Unknown adapter (or one the caller may not see)",
    413: "Request body over its size limit",
    422: "A field of the wrong type, out of range, or an adapter that cannot be served",
    429: "A limit is reached (the error names it); retry after the Retry-After header's seconds",
    500: 'Internal error (counted in requests_total{outcome="error"})',
    503: "The engine is down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _MEANING[status]} for status in statuses}
