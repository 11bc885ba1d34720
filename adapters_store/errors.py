"""Error types for adapter uploads and the on-disk store.

Every error carries the HTTP status the server should answer with, so the HTTP layer can map
``AdapterError`` to a response without knowing the individual failure modes.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class. ``status`` is the HTTP status code; ``str(err)`` names the offending item."""

    status: int = 422
    code: str = "invalid_adapter"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedUpload(AdapterError):
    """The bytes cannot be decoded at all (bad JSON, not safetensors)."""

    status = 400
    code = "malformed_upload"


class InvalidAdapterId(AdapterError):
    status = 400
    code = "invalid_adapter_id"


class InvalidAdapter(AdapterError):
    """Well-formed files whose contents are inconsistent (shapes, keys, NaN, unknown modules...)."""

    status = 422
    code = "invalid_adapter"


class UnsupportedAdapter(AdapterError):
    """A valid PEFT adapter that this server cannot serve exactly (other peft_type, variants, ...)."""

    status = 422
    code = "unsupported_adapter"


class AdapterTooLarge(AdapterError):
    status = 413
    code = "adapter_too_large"


class AdapterNotFound(AdapterError):
    status = 404
    code = "adapter_not_found"


class StoreConflict(AdapterError):
    """E.g. removing the version that CURRENT still names."""

    status = 409
    code = "store_conflict"


class StoreCorrupted(AdapterError):
    """A stored file no longer matches its manifest (size or sha256)."""

    status = 500
    code = "store_corrupted"
