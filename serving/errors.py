"""Failures of a request -> an HTTP status and SD.Next's error JSON.

The mapping is the extension's (extension/errors.py `status_for`): 400 bad request, 422 unusable model file, 507 out
of memory, 500 anything else; plus the serving-only ones: 401 unauthorised, 404 unknown task, 409 interrupted, 413
body too large, 503 queue full (with Retry-After), 504 per-request timeout. A failed generation is never a 200
without images.

SD.Next's API middleware answers errors as {"error": <class>, "code": <status>, "detail": <message>, "body": "",
"errors": <message>} (modules/api/middleware.py handle_exception); `error_body` gives the same shape.
"""

from __future__ import annotations

from typing import Any

from cascade.errors import CascadeError, CheckpointError, InvalidRequestError


class ServeError(CascadeError):
    """A request that cannot be answered with images: `status` is the HTTP status, str() the message for the user."""

    def __init__(self, message: str, status: int = 500, headers: dict[str, str] | None = None, error: str | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        self.error = error or type(self).__name__


class QueueFull(ServeError):
    """The bounded queue is full: 503 with Retry-After (seconds until a slot is likely free)."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the queue is full ({queued} requests waiting); retry in about {retry_after} s",
                         503, {"Retry-After": str(retry_after)})


class Interrupted(ServeError):
    """Stopped by POST /sdapi/v1/interrupt before any image was finished."""

    def __init__(self, message: str):
        super().__init__(message, 409)


class TimedOut(ServeError):
    """The request ran past its deadline (queue wait included); it was stopped at the next step."""

    def __init__(self, message: str):
        super().__init__(message, 504)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or the engine's message after its own out-of-memory fallback gave up."""
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def status_for(exc: BaseException) -> int:
    """400 bad request, 422 unusable model, 507 out of memory, 500 otherwise (ServeError carries its own)."""
    if isinstance(exc, ServeError):
        return exc.status
    if is_out_of_memory(exc):
        return 507
    if isinstance(exc, InvalidRequestError):
        return 400
    if isinstance(exc, CheckpointError):
        return 422
    return 500


def message_for(exc: BaseException) -> str:
    """Our errors keep their user-facing text; anything else is named by its class (a bug, logged by the caller)."""
    if isinstance(exc, CascadeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def error_body(status: int, message: str, error: str) -> dict[str, Any]:
    """SD.Next's error JSON (modules/api/middleware.py)."""
    return {"error": error, "code": status, "detail": message, "body": "", "errors": message}
