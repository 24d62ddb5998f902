"""The one exception class that carries a failure out of SD.Next's processing to the user.

Why a class of our own: SD.Next catches `ValueError`, `RuntimeError` (torch's OOM included) and `AssertionError`
around the pipeline call and turns them into a *successful* response with no images (HTTP 200, `images: []`).
Any other exception class travels up to the API middleware, which answers with a JSON error carrying
`status_code`/`detail` from the exception, and to the UI's error box. So every failure of a Stable Cascade
generation is re-raised as `CascadeHostError`, which subclasses `Exception` only.

Logging: SD.Next's middleware prints a full traceback for any exception that is not a fastapi HTTPException of
400/401/404 (and a debug traceback for other HTTPException codes), so every expected 4xx would cost ~130 log lines.
`extension.routes.install_error_handler` registers a handler for `CascadeHostError` on SD.Next's app (Starlette
picks the handler of the most specific class), which logs `log_line` once and answers with SD.Next's error shape.
"""

from __future__ import annotations

from typing import Any

from cascade.errors import CascadeError, CheckpointError, InvalidRequestError


class CascadeHostError(Exception):
    """A failure reported to the host's user: `str()` is the message, `status_code` the HTTP status.

    `expected`: a failure the user can act on (a bad request, an unusable file, NaN output from a damaged model),
    logged as one line; unexpected ones (bugs) keep their traceback in the log. Default: every 4xx is expected."""

    def __init__(self, message: str, status_code: int = 500, *, expected: bool | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.detail = message
        self.expected = status_code < 500 if expected is None else expected


def status_for(exc: BaseException) -> int:
    """400 for a bad request, 422 for an unusable model file, 507 for out-of-memory, 500 for anything else."""
    if isinstance(exc, CascadeHostError):
        return exc.status_code
    if isinstance(exc, (InvalidRequestError, ValueError)):
        return 400
    if isinstance(exc, CheckpointError):
        return 422
    if "out of memory" in str(exc).lower():
        return 507
    return 500


def host_error(exc: BaseException, what: str) -> CascadeHostError:
    """Wrap `exc` with a message that says what failed; our own errors keep their (user-facing) text."""
    if isinstance(exc, CascadeHostError):
        return exc
    if isinstance(exc, CascadeError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower():
        text += (" — the GPU ran out of memory; try a smaller size, batch size 1, or SD.Next's balanced offload "
                 "(Settings > Models & Loading > Model offload mode)")
    status = status_for(exc)
    return CascadeHostError(f"Stable Cascade {what} failed: {text}", status,
                            expected=status < 500 or isinstance(exc, CascadeError))


def response_body(exc: CascadeHostError) -> dict[str, Any]:
    """The JSON body SD.Next's API middleware (modules/api/middleware.py handle_exception) gives every error, so a
    client sees one error shape whichever handler answered."""
    return {"error": type(exc).__name__, "code": exc.status_code, "detail": exc.detail, "body": "", "errors": str(exc)}


def log_line(exc: CascadeHostError, method: str, path: str) -> str:
    """The one line an expected error leaves in SD.Next's log (SD.Next's own handler would add a traceback)."""
    return f"Stable Cascade: {method} {path} -> {exc.status_code}: {exc}"
