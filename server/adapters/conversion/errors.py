"""The one error of a conversion that is the request's fault, not the server's."""

from __future__ import annotations

from server.errors import ServerError


class ConversionRefused(ServerError):
    """The request names something that cannot be converted as asked (unreachable target, zero update,
    incompatible sources, a file that is not a fine-tune of this base): 422, naming why."""

    status = 422
    error_type = "conversion_refused"
