"""The one exception class that carries a failure out of SD.Next's processing to the user.

Why a class of our own: SD.Next catches `ValueError`, `RuntimeError` (torch's OOM included) and `AssertionError`
around the pipeline call and turns them into a *successful* response with no images (HTTP 200, `images: []`).
Any other exception class travels up to the API middleware, which answers with a JSON error carrying
`status_code`/`detail` from the exception, and to the UI's error box. So every failure of a Stable Cascade
generation is re-raised as `CascadeHostError`, which subclasses `Exception` only.
"""

from __future__ import annotations

from cascade.errors import CascadeError, CheckpointError, InvalidRequestError


class CascadeHostError(Exception):
    """A failure reported to the host's user: `str()` is the message, `status_code` the HTTP status."""

    def __init__(self, message: str, status_code: int = 500):
        super().__init__(message)
        self.status_code = status_code
        self.detail = message


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
    return CascadeHostError(f"Stable Cascade {what} failed: {text}", status_for(exc))
