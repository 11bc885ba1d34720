"""The error envelope of every answer, chosen by the route's path.

Our own routes: `{"error": {"message", "type"}}` with `type` our specific kind. The OpenAI-compatible
routes (`/v1/...`): OpenAI's `{"error": {"message", "type", "param", "code"}}`, where `type` is
OpenAI's class of error for the status (what its SDK and clients switch on), `code` our specific
kind and `param` the offending body field when known.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

OPENAI_PREFIX = "/v1"

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def is_openai(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def openai_type(status: int) -> str:
    return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(path: str, status: int, message: str, kind: str, param: str | None = None) -> dict:
    if is_openai(path):
        return {"error": {"message": message, "type": openai_type(status), "param": param, "code": kind}}
    return {"error": {"message": message, "type": kind}}


def error_response(
    path: str, status: int, message: str, kind: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, kind, param), status_code=status, headers=headers)


def validation_details(errors: list[dict]) -> tuple[str, str | None]:
    """(code, param) of a failed body validation, from its first error: pydantic's error type (an
    unknown field is `unsupported_parameter`, as our own refusals of unsupported fields) and the
    field's path written `messages[0].content`, or the `param` a validator named itself."""
    if not errors:
        return "invalid_request", None
    first = errors[0]
    code = "unsupported_parameter" if first.get("type") == "extra_forbidden" else str(first.get("type"))
    param = (first.get("ctx") or {}).get("param")
    return code, param if param is not None else _field_path(tuple(first.get("loc", ())))


def _field_path(loc: tuple) -> str | None:
    path = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier():  # not a union member's tag such as "list[int]"
            path += f".{part}" if path else part
    return path if path and not path.startswith("[") else None  # e.g. a JSON syntax error's position
