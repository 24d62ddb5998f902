"""What a device can compute in, decided from `Capabilities` only, so every vendor follows the same rules.

This is device knowledge, not model knowledge: which dtype a given model part should use is the caller's policy
(the Stable Cascade engine keeps its per-stage rules in `cascade.precision`). Here:
  * `check_dtype`: a dtype the device cannot run at all raises UnsupportedDtype (never swapped silently);
    one it runs only emulated is allowed with a warning.
  * `safer_dtype`: the retry order after a NaN/inf: fp16 -> bf16 (if native) else fp32; bf16 -> fp32; fp32 -> None.
  * `preferred_low_precision`: the fastest native half type (bf16, else fp16), or None.
OpenVINO: torch-side modules stay fp32 (its torch frontend cannot convert bf16 modules); OpenVINO picks the
execution precision itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .types import UnsupportedDtype

if TYPE_CHECKING:
    from .base import Backend

log = logging.getLogger(__name__)

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOW = (torch.float16, torch.bfloat16)


def check_dtype(backend: "Backend", dtype: torch.dtype, *, what: str = "the model") -> torch.dtype:
    """`dtype` when `backend` can run it; raises UnsupportedDtype when it cannot run at all. `what` names the
    workload in the warning for an emulated (slow) dtype."""
    if dtype not in COMPUTE_DTYPES:
        raise UnsupportedDtype(f"{dtype} is not a compute dtype (use float32, float16 or bfloat16)")
    c = backend.capabilities
    if backend.name == "openvino" and dtype == torch.bfloat16:
        raise UnsupportedDtype("bfloat16 modules cannot be converted by OpenVINO's torch frontend; use float32 "
                               "(OpenVINO chooses bf16 execution itself on AMX CPUs)")
    if backend.name == "mps" and dtype == torch.bfloat16 and not c.bf16:
        raise UnsupportedDtype("bfloat16 on MPS needs macOS 14 or newer")
    if dtype == torch.bfloat16 and not c.bf16:
        log.warning("%s requested in bf16 on %s without native bf16: it will be emulated and slow", what,
                    backend.description)
    return dtype


def preferred_low_precision(backend: "Backend") -> torch.dtype | None:
    """bf16 where native, else fp16 where native, else None; None on OpenVINO (torch modules stay fp32 there)."""
    if backend.name == "openvino":
        return None
    c = backend.capabilities
    if c.bf16:
        return torch.bfloat16
    return torch.float16 if c.fp16 else None


def safer_dtype(backend: "Backend", dtype: torch.dtype) -> torch.dtype | None:
    """fp16 -> bf16 (if native) else fp32; bf16 -> fp32; fp32 -> None (nothing safer)."""
    if dtype == torch.float16:
        return torch.bfloat16 if backend.capabilities.bf16 else torch.float32
    if dtype == torch.bfloat16:
        return torch.float32
    return None


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in _LOW
