"""The `Backend` value the engine asks for everything device-specific.

A Backend is plain data (name, torch device, capabilities, why it was chosen) plus thin methods that delegate
to one module per concern (dtypes, attention, memory, env, openvino).  Device-specific branches live in those
modules, never here.  The shared value types are in `types`; those modules import only `types` (and refer to
`Backend` for type checking only), so importing any of them never goes through this file: no import circle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, MutableMapping

import torch

from . import attention as attention_mod
from . import dtypes as dtypes_mod
from . import env as env_mod
from . import memory as memory_mod
from . import openvino as openvino_mod
from .types import BACKEND_NAMES, AttentionPolicy, Capabilities, EnvChange, MemoryInfo


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

    # -- dtypes -------------------------------------------------------------------------------------------
    def check_dtype(self, dtype: torch.dtype, *, what: str = "the model") -> torch.dtype:
        """`dtype` if this device can run it (warns when only emulated); UnsupportedDtype if it cannot at all."""
        return dtypes_mod.check_dtype(self, dtype, what=what)

    def preferred_low_precision(self) -> torch.dtype | None:
        """bf16 where native, else fp16 where native, else None (always None on OpenVINO)."""
        return dtypes_mod.preferred_low_precision(self)

    def safer_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """Next dtype to retry with after NaN/inf: fp16 -> bf16 (if native) else fp32; bf16 -> fp32; fp32 -> None."""
        return dtypes_mod.safer_dtype(self, dtype)

    # -- attention ----------------------------------------------------------------------------------
    @property
    def max_attention_bytes(self) -> int | None:
        """Largest attention score tensor to create in one piece; None = no limit (plain SDPA)."""
        return attention_mod.attention_policy(self).max_bytes

    @property
    def attention(self) -> AttentionPolicy:
        return attention_mod.attention_policy(self)

    # -- memory and sync ----------------------------------------------------------------------------
    def memory(self) -> MemoryInfo:
        return memory_mod.memory_info(self)

    def reset_peak_memory(self) -> None:
        memory_mod.reset_peak(self)

    def synchronize(self) -> None:
        memory_mod.synchronize(self)

    def empty_cache(self) -> None:
        memory_mod.empty_cache(self)

    def compile_for_device(self, module: torch.nn.Module, *, cache_dir=None, entry: str = "forward",
                           precision: str | None = None):
        """The module as this backend runs it: unchanged for torch devices; compiled (IR cached in `cache_dir`) for
        OpenVINO, whose graphs run on `ov_device`. `entry` names the method to compile ("decode" for a VQ model);
        `precision` is OpenVINO's INFERENCE_PRECISION_HINT ("f32", "f16"; None = the device's default), chosen by
        the caller, which knows whether its model tolerates the device's default."""
        if self.name != "openvino":
            return module
        return openvino_mod.compile_module(module, device=self.ov_device or "CPU", cache_dir=cache_dir,
                                           precision=precision, entry=entry)

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
        """Set this backend's recommended variables where the user has not set them (see cascade_backends.env).

        Call before the device runtime initialises (first allocation); capabilities that depend on the
        environment (XPU allocation limit) are re-read afterwards."""
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
