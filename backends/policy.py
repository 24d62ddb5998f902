"""Dtype and attention policy.  Derived from Capabilities only, so every vendor follows the same rules.

Stage C (prior): bf16 where the hardware has it natively, else fp32; never fp16 unless explicitly requested
  (the official weights overflow to NaN in fp16: Stability's readme, diffusers docs, diffusers#6970).
Stage B (decoder): bf16 if native, else fp16 if native, else fp32.
Text encoder (CLIP-bigG): same rule as Stage B.
Stage A (vqgan): fp32 - 20 M parameters, the cost is negligible and it is the most stable choice.
OpenVINO: torch-side modules stay fp32; OpenVINO picks the execution precision (see openvino.precision_hint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base import GiB, STAGES, UnsupportedDtype

if TYPE_CHECKING:
    from .base import Backend

log = logging.getLogger(__name__)

_LOW = (torch.float16, torch.bfloat16)


def default_dtype(backend: "Backend", stage: str) -> torch.dtype:
    c = backend.capabilities
    if backend.name == "openvino":
        return torch.float32
    if stage == "prior":
        return torch.bfloat16 if c.bf16 else torch.float32
    if stage in ("decoder", "text_encoder"):
        if c.bf16:
            return torch.bfloat16
        return torch.float16 if c.fp16 else torch.float32
    return torch.float32  # vqgan


def dtype_for(backend: "Backend", stage: str, requested: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype for `stage`.  `requested` wins (fp16 for the prior only this way), but a dtype the
    backend cannot run at all raises UnsupportedDtype rather than being swapped silently."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if requested is None:
        return default_dtype(backend, stage)
    if requested not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedDtype(f"{requested} is not a compute dtype (use float32, float16 or bfloat16)")
    c = backend.capabilities
    if backend.name == "openvino" and requested == torch.bfloat16:
        raise UnsupportedDtype("bfloat16 modules cannot be converted by OpenVINO's torch frontend; use float32 "
                               "(OpenVINO chooses bf16 execution itself on AMX CPUs)")
    if backend.name == "mps" and requested == torch.bfloat16 and not c.bf16:
        raise UnsupportedDtype("bfloat16 on MPS needs macOS 14 or newer")
    if requested == torch.bfloat16 and not c.bf16:
        log.warning("%s requested in bf16 on %s without native bf16: it will be emulated and slow", stage,
                    backend.description)
    if requested == torch.float16 and stage == "prior":
        log.warning("prior (Stage C) requested in fp16: the official weights are known to overflow (NaN); the NaN "
                    "guard will retry in a safer dtype")
    return requested


def safer_dtype(backend: "Backend", dtype: torch.dtype) -> torch.dtype | None:
    """fp16 -> bf16 (if native) else fp32; bf16 -> fp32; fp32 -> None (nothing safer)."""
    if dtype == torch.float16:
        return torch.bfloat16 if backend.capabilities.bf16 else torch.float32
    if dtype == torch.bfloat16:
        return torch.float32
    return None


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in _LOW


# --- attention --------------------------------------------------------------------------------------------
# When a device caps single allocations, attention scores are chunked to a quarter of the cap: softmax needs
# temporaries of the same size (and the math path may upcast), so 4 GiB Arc gets 1 GiB chunks - the size
# SD.Next's slicer uses too.
ATTENTION_FRACTION = 4


@dataclass(frozen=True)
class AttentionPolicy:
    kernel: str  # what F.scaled_dot_product_attention is expected to dispatch to (informational)
    max_bytes: int | None  # chunk attention so no score tensor exceeds this; None = plain SDPA
    reason: str


_KERNELS = {
    "cuda": "SDPA (flash / memory-efficient / cuDNN, chosen by torch)",
    "rocm": "SDPA (AOTriton flash/mem-efficient where built for the arch, else math)",
    "xpu": "SDPA (oneDNN fused on torch >= 2.7; FlashAttention only on Battlemage/PVC)",
    "mps": "SDPA (MPS fused kernel)",
    "cpu": "SDPA (CPU flash-attention kernel)",
    "openvino": "OpenVINO ScaledDotProductAttention (fused by the converter)",
}


def attention_policy(backend: "Backend") -> AttentionPolicy:
    limit = backend.capabilities.max_alloc_bytes
    kernel = _KERNELS[backend.name]
    if limit is None:
        return AttentionPolicy(kernel, None, "no single-allocation limit: plain SDPA")
    chunk = max(limit // ATTENTION_FRACTION, 64 * 1024**2)
    return AttentionPolicy(f"chunked {kernel}", chunk,
                           f"device caps one allocation at {limit / GiB:.1f} GiB: attention scores chunked to "
                           f"<= {chunk / GiB:.2f} GiB")
