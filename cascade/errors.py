"""Errors the engine raises for bad input. Every message says what is wrong and what to do about it.

Hosts (the CLI, the SD.Next extension) catch `CascadeError` and show `str(err)`; anything else is a bug.
"""

from __future__ import annotations


class CascadeError(Exception):
    """Base class of user-facing errors."""


class CheckpointError(CascadeError):
    """A checkpoint file or folder cannot be used."""


class PickleRefusedError(CheckpointError):
    """A pickled checkpoint (.ckpt/.pt/.pth/.bin) was given; pickles can run arbitrary code."""


class CorruptFileError(CheckpointError):
    """The file is not a readable safetensors file (truncated, damaged header, offsets outside the file)."""


class HeaderError(CorruptFileError):
    """A malformed safetensors header, or a malformed config embedded in its metadata: the one type the header
    reader raises for any header it cannot trust. `field` names what is wrong (a tensor's `data_offsets`,
    `__metadata__`, ...); `offset` is the byte offset in the file where that is known."""

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.field = field
        self.offset = offset


class NotStableCascadeError(CheckpointError):
    """The file is a model of another family (SD 1.5, SDXL, ...) or not a model at all."""


class WrongStageError(CheckpointError):
    """A Stage B file was given where Stage C is expected, or the reverse."""


class IncompatibleStagesError(CheckpointError):
    """The stages given cannot be combined (their conditioning interfaces differ)."""


class MissingComponentError(CheckpointError):
    """A needed component (text encoder, Stage A) was found nowhere."""


class InvalidRequestError(CascadeError):
    """A generation parameter is out of range (size not a multiple of 128, steps < 1, ...)."""


class GenerationInterrupted(CascadeError):
    """The host asked to stop; raised between sampling steps, never in the middle of one."""


def describe_unexpected(err: BaseException) -> str:
    """One line for an exception no rule anticipated: out-of-memory and backend failures get their fix, anything
    else is named as an internal error (a bug to report), never shown as a raw traceback to the user."""
    name = type(err).__name__
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if name in ("OutOfMemoryError", "MemoryError") or "out of memory" in text.lower():
        return (f"out of memory ({text or name}): use a smaller size or batch, --offload sequential, or --vram with "
                "a lower budget")
    return f"internal error: {name}: {text}" if text else f"internal error: {name}"
