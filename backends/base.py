"""The `Backend` value the engine asks for everything device-specific.

A Backend is plain data (name, torch device, capabilities, why it was chosen) plus thin methods that delegate
to one module per concern (policy, memory, env).  Device-specific branches live in those modules, never here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, MutableMapping

import torch

BACKEND_NAMES = ("cuda", "rocm", "xpu", "mps", "openvino", "cpu")
STAGES = ("text_encoder", "prior", "decoder", "vqgan")
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


@dataclass
class Backend:
    """One usable compute target.

    name: "cuda" | "rocm" | "xpu" | "mps" | "openvino" | "cpu".  ROCm's torch device is still "cuda";
    OpenVINO's torch device is "cpu" and compiled graphs run on `ov_device`.
    """

    name: str
    device: torch.device
    description: str
    capabilities: Capabilities
    arch: str | None = None  # "sm_89", "gfx1100", "Intel(R) Arc(TM) A770 Graphics", "x86_64", ...
    flavor: str | None = None  # "zluda" for ZLUDA-on-CUDA
    ov_device: str | None = None  # OpenVINO device ("CPU", "GPU", "GPU.1") when name == "openvino"
    reasons: list[str] = field(default_factory=list)  # why this backend / these flags were chosen
    warnings: list[str] = field(default_factory=list)  # actionable problems found during detection
    torch_mod: Any = field(default=None, repr=False, compare=False)  # torch or a test stand-in

    def __post_init__(self) -> None:
        if self.name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend name {self.name!r}; expected one of {BACKEND_NAMES}")
        if self.torch_mod is None:
            self.torch_mod = torch

    @property
    def index(self) -> int:
        return self.device.index or 0

    # -- dtype policy -------------------------------------------------------------------------------
    def dtype_for(self, stage: str, requested: torch.dtype | None = None) -> torch.dtype:
        """Compute dtype for a Cascade stage ("text_encoder", "prior", "decoder", "vqgan")."""
        from . import policy

        return policy.dtype_for(self, stage, requested)

    def safer_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """Next dtype to retry with after NaN/inf: fp16 -> bf16 (if native) else fp32; bf16 -> fp32; fp32 -> None."""
        from . import policy

        return policy.safer_dtype(self, dtype)

    # -- attention ----------------------------------------------------------------------------------
    @property
    def max_attention_bytes(self) -> int | None:
        """Largest attention score tensor to create in one piece; None = no limit (plain SDPA)."""
        from . import policy

        return policy.attention_policy(self).max_bytes

    @property
    def attention(self):  # -> policy.AttentionPolicy
        from . import policy

        return policy.attention_policy(self)

    # -- memory and sync ----------------------------------------------------------------------------
    def memory(self) -> MemoryInfo:
        from . import memory

        return memory.memory_info(self)

    def reset_peak_memory(self) -> None:
        from . import memory

        memory.reset_peak(self)

    def synchronize(self) -> None:
        from . import memory

        memory.synchronize(self)

    def empty_cache(self) -> None:
        from . import memory

        memory.empty_cache(self)

    def compile_for_device(self, module: torch.nn.Module, stage: str, *, cache_dir=None, entry: str = "forward"):
        """The module as this backend runs it: unchanged for torch devices; compiled (IR cached in `cache_dir`) for
        OpenVINO, whose graphs run on `ov_device`. `entry` names the method to compile ("decode" for Stage A)."""
        if self.name != "openvino":
            return module
        from . import openvino

        return openvino.compile_module(module, device=self.ov_device or "CPU", cache_dir=cache_dir, stage=stage, entry=entry)

    @property
    def pinned_host_memory(self) -> bool:
        """Whether page-locked host copies speed up uploads: discrete accelerators behind PCIe (CUDA/ROCm, XPU).
        MPS shares memory with the host and OpenVINO/CPU compute on host tensors, so pinning only costs RAM."""
        return self.name in ("cuda", "rocm", "xpu")

    def copy_stream(self):
        """A side stream for weight uploads that overlap compute (CUDA/ROCm and XPU), else None (copies are then
        synchronous). Used by the offload executor when it streams blocks."""
        if not self.pinned_host_memory:
            return None
        return self.torch_mod.get_device_module(self.device.type).Stream(device=self.device)

    def generator(self, seed: int) -> torch.Generator:
        """Always a CPU generator: the same seed gives the same noise on every vendor (and XPU generators are
        avoided on purpose, SD.Next does the same).  Draw noise on CPU, then move it to `device`."""
        return torch.Generator(device="cpu").manual_seed(int(seed))

    # -- environment --------------------------------------------------------------------------------
    def apply_environment(self, env: MutableMapping[str, str] | None = None) -> list[EnvChange]:
        """Set this backend's recommended variables where the user has not set them (see backends.env).

        Call before the device runtime initialises (first allocation); capabilities that depend on the
        environment (XPU allocation limit) are re-read afterwards."""
        from . import env as env_mod

        return env_mod.apply_environment(self, os.environ if env is None else env)

    def summary(self) -> Mapping[str, Any]:
        """JSON-friendly description (used by the doctor and the infotext)."""
        c = self.capabilities
        return {
            "name": self.name,
            "device": str(self.device),
            "ov_device": self.ov_device,
            "description": self.description,
            "arch": self.arch,
            "flavor": self.flavor,
            "bf16": c.bf16,
            "fp16": c.fp16,
            "fp64": c.fp64,
            "max_alloc_bytes": c.max_alloc_bytes,
            "total_memory": c.total_memory,
        }
