"""The value types and errors every module of the device layer shares.

This module imports nothing from the package, so any module can import it without an import circle: the modules
that decide things (capabilities, dtypes, attention, memory, env, openvino) import only this file, `base.Backend`
imports them, and `detect`/`doctor` sit on top.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKEND_NAMES = ("cuda", "rocm", "xpu", "mps", "openvino", "cpu")
GiB = 1024**3


class BackendUnavailable(RuntimeError):
    """A requested backend cannot be used; the message says what is missing and what to install."""


class UnsupportedDtype(ValueError):
    """A requested dtype cannot run on this backend at all (not merely slowly)."""


@dataclass(frozen=True)
class Capabilities:
    """What the device can do natively.  `bf16`/`fp16` mean *fast, native* support, not emulation."""

    bf16: bool
    fp16: bool
    fp64: bool
    max_alloc_bytes: int | None = None  # largest single allocation; None = no limit known
    total_memory: int | None = None  # bytes
    notes: tuple[str, ...] = ()  # how each flag was decided (shown by the doctor)


@dataclass(frozen=True)
class MemoryInfo:
    """Bytes; None where the backend cannot know (e.g. peak on MPS, allocator stats on CPU)."""

    total: int | None
    free: int | None
    allocated: int | None = None
    reserved: int | None = None
    peak: int | None = None


@dataclass(frozen=True)
class EnvChange:
    """One recommended environment variable: whether we set it, and why it is recommended."""

    name: str
    value: str
    reason: str
    applied: bool  # False when the user had already set it (their value wins)
    previous: str | None = None
    when: str = "first-use"  # when the variable is read: "import" | "device-init" | "first-use"
    effective_now: bool = True  # False: set too late to affect this process (still inherited by children)


@dataclass(frozen=True)
class AttentionPolicy:
    """How attention runs on a device: the kernel SDPA is expected to use, and the score budget (None = none)."""

    kernel: str  # what F.scaled_dot_product_attention is expected to dispatch to (informational)
    max_bytes: int | None  # chunk attention so no score tensor exceeds this; None = plain SDPA
    reason: str
