"""Which dtype each Stable Cascade component computes in, on a given device; and what to say when one overflows.

The device layer (`cascade_backends`) only knows what a device can run (native bf16/fp16, what is impossible, the
retry order after a NaN); the per-stage rules are model knowledge and live here:

  Stage C (prior): bf16 where the hardware has it natively, else fp32; never fp16 unless explicitly requested
    (the official weights overflow to NaN in fp16: Stability's readme, diffusers docs, diffusers#6970).
  Stage B (decoder): bf16 if native, else fp16 if native, else fp32.
  Text encoder (CLIP-bigG): the same rule as Stage B.
  Stage A (vqgan): fp32 - 20 M parameters, the cost is negligible and it is the most stable choice.
  OpenVINO: torch-side modules stay fp32; OpenVINO picks the execution precision, except that the prior gets
    INFERENCE_PRECISION_HINT=f32 on an OpenVINO GPU, whose plugin runs f16 by default.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .errors import InvalidRequestError
from .names import COMPONENTS

if TYPE_CHECKING:
    from cascade_backends import Backend
    from cascade_backends.doctor import Advice

log = logging.getLogger(__name__)

_TITLES = {"text_encoder": "text encoder", "prior": "prior (Stage C)", "decoder": "decoder (Stage B)",
           "vqgan": "Stage A"}


def default_dtype(backend: "Backend", component: str) -> torch.dtype:
    """The rule above for `component` ("text_encoder", "prior", "decoder", "vqgan") on `backend`."""
    _check_component(component)
    if backend.name == "openvino" or component == "vqgan":
        return torch.float32
    if component == "prior":
        return torch.bfloat16 if backend.capabilities.bf16 else torch.float32
    return backend.preferred_low_precision() or torch.float32  # decoder, text encoder


def dtype_for(backend: "Backend", component: str, requested: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype for `component`. `requested` wins (fp16 for the prior only this way), but a dtype the
    device cannot run at all raises cascade_backends.UnsupportedDtype rather than being swapped silently."""
    if requested is None:
        return default_dtype(backend, component)
    _check_component(component)
    backend.check_dtype(requested, what=_TITLES[component])
    if requested == torch.float16 and component == "prior":
        log.warning("prior (Stage C) requested in fp16: the official weights are known to overflow (NaN); the NaN "
                    "guard will retry in a safer dtype")
    return requested


OPENVINO_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def openvino_precision(backend: "Backend", component: str, dtype: torch.dtype = torch.float32) -> str | None:
    """OpenVINO's INFERENCE_PRECISION_HINT for `component` computed at `dtype`: always explicit on OpenVINO, because
    the plugins pick their own default otherwise (the GPU plugin f16, which overflows Stage C; the CPU plugin bf16
    on AMX/AVX512-BF16 hosts only), so the same request would give different images on different hosts. A prior
    asked for in fp16 still runs f32 on an OpenVINO GPU (not fp16-safe). None on every other backend."""
    _check_component(component)
    if backend.name != "openvino":
        return None
    if component == "prior" and dtype == torch.float16 and str(backend.ov_device or "").upper().startswith("GPU"):
        return "f32"
    return OPENVINO_HINTS.get(dtype, "f32")


def explain_non_finite(stage: str, dtype: torch.dtype, modules: Mapping[str, Any], retried: str | None = None) -> str:
    """The error message for a stage whose output is NaN/inf, naming the likely cause: NaN/inf weights (a damaged
    or badly converted file) when the weights hold any, else an extreme guidance (CFG) scale or a dtype too narrow."""
    from cascade_backends.nan_guard import dtype_name, non_finite_weights

    ran = f"{dtype_name(dtype)} and again in {retried}" if retried else dtype_name(dtype)
    head = f"The {stage} produced NaN/inf in {ran}; no image was written."
    bad = non_finite_weights(modules)
    if bad:
        where = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in bad.items())
        return (f"{head} Likely cause: the model's weights contain NaN/inf ({where}), so the file is damaged or "
                "badly converted; download it again or re-export it.")
    return (f"{head} The weights are finite, so the likely cause is an extreme CFG (guidance) scale that "
            "overflows the guided prediction: use a CFG in the model card's range (about 4-7 for the prior, 1-1.5 "
            "for the decoder). If it happens at a normal CFG, the weights may be damaged (values far too large): "
            + ("download the file again." if dtype == torch.float32 else "try fp32, or download the file again."))


def advice(backend: "Backend") -> "Advice":
    """What Stable Cascade would run in on `backend`, for the device doctor (`python -m cascade backends`)."""
    from cascade_backends.doctor import Advice

    dtypes = {c: str(default_dtype(backend, c)).replace("torch.", "") for c in COMPONENTS}
    hints = {c: openvino_precision(backend, c, default_dtype(backend, c)) for c in COMPONENTS}
    warnings: tuple[str, ...] = ()
    c = backend.capabilities
    if backend.name in ("cuda", "rocm", "xpu", "mps") and not c.bf16:
        warnings = ("no native bf16 - Stage C (prior) will run in fp32 (about 2x the memory of bf16: use the lite "
                    "prior, offload, or a bf16-capable GPU)"
                    + ("; fp16 is not used for Stage C because its weights overflow" if c.fp16 else ""),)
    return Advice(dtypes=dtypes, openvino_precision=hints if backend.name == "openvino" else {}, warnings=warnings)


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'auto'/None -> None (backend policy); 'bf16', 'fp16', 'fp32' -> torch dtypes."""
    if name is None or name == "auto":
        return None
    try:
        return _DTYPE_NAMES[name.lower()]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype {name!r}; use auto, bf16, fp16 or fp32") from None


def choose_dtypes(backend: "Backend", requested: str | torch.dtype | None = None) -> dict[str, torch.dtype]:
    """Per-component compute dtypes on `backend`: the policy above, with `requested` (a torch dtype or a name:
    auto, bf16, fp16, fp32) for the two UNets only."""
    requested = requested if isinstance(requested, torch.dtype) else parse_dtype(requested)
    return {component: dtype_for(backend, component, requested if component in ("prior", "decoder") else None)
            for component in COMPONENTS}
