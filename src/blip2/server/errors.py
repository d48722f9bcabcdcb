"""Every failure the service answers, as one JSON shape: `{"error": {"type": ..., "message": ...}}`.

`ServiceError` carries the HTTP status, a short machine-readable type and a message for people; the task
layer's own errors (`blip2.Blip2Error`) map to 4xx with their message (`from_blip2_error`). Anything else
is a bug: logged here with its traceback, answered as a bare 500.
"""

from __future__ import annotations

import logging

from ..errors import Blip2Error, CheckpointError, ImageError, InputError

log = logging.getLogger("blip2.server")


class ServiceError(Exception):
    """An error answered to the client: `status`, `type` (e.g. "invalid_request"), `message`, and extra
    response headers (Retry-After)."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.type, self.message)


def error_body(type: str, message: str) -> dict:
    return {"error": {"type": type, "message": message}}


def invalid(message: str) -> ServiceError:
    """422: a field of the request is wrong; `message` names it."""
    return ServiceError(422, "invalid_request", message)


def too_large(message: str) -> ServiceError:
    """413: the body or an image is larger than the service's limit."""
    return ServiceError(413, "too_large", message)


def from_blip2_error(error: Blip2Error) -> ServiceError:
    """The task layer's errors as client errors: a bad input or image is 422, a task the loaded checkpoint
    cannot do (matching with a captioning checkpoint) is 400."""
    if isinstance(error, ImageError):
        return ServiceError(422, "invalid_image", str(error))
    if isinstance(error, InputError):
        return invalid(str(error))
    if isinstance(error, CheckpointError):
        return ServiceError(400, "unsupported", str(error))
    return ServiceError(400, "bad_request", str(error))


def internal(error: BaseException, where: str) -> ServiceError:
    """A 500 for an unexpected exception: the traceback goes to the server's log, never to the client."""
    log.error("internal error in %s", where, exc_info=error)
    return ServiceError(500, "internal_error", "internal server error (the server log has the details)")


def from_exception(error: BaseException, where: str) -> ServiceError:
    """Whatever a request ended with, as the error to answer."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, Blip2Error):
        return from_blip2_error(error)
    return internal(error, where)
