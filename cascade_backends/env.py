"""Recommended environment variables per backend, applied only where the user has not set them.

A user's value always wins, including an explicit "0" to opt out.  Each variable records *when* it is read:
  "import"      - when torch is imported (op fallback registration): setting it later only helps child
                  processes, so it must be exported before launch.  SD.Next's launcher sets these itself.
  "device-init" - when the device runtime starts: effective only before the first device query.
  "first-use"   - when the library first needs it (MIOpen find, SDPA dispatch): effective any time before.
Call apply_early() first thing (before select_backend) to get the most out of them in the same process.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any, MutableMapping, NamedTuple

import torch

from . import capabilities
from .types import EnvChange

if TYPE_CHECKING:
    from .base import Backend


class Recommendation(NamedTuple):
    value: str
    when: str  # "import" | "device-init" | "first-use"
    reason: str


# One table; nothing else in the package sets variables.
RECOMMENDED: dict[str, dict[str, Recommendation]] = {
    "xpu": {
        "SYCL_CACHE_PERSISTENT": Recommendation(
            "1", "device-init", "keep JIT-compiled SYCL kernels on disk between runs (default off): avoids "
                                "recompiling every kernel at each start"),
        "UR_L0_ENABLE_RELAXED_ALLOCATION_LIMITS": Recommendation(
            "1", "device-init", "let Level Zero allocate buffers over 4 GiB on Arc Alchemist (otherwise large "
                                "tensors OOM at '4.00 GiB'). Trade-off: kernels are built for >4 GiB addressing, "
                                "which can be slower on A-series; set it to 0 to keep the limit (attention is then "
                                "chunked to 1 GiB instead)"),
        "PYTORCH_ENABLE_XPU_FALLBACK": Recommendation(
            "1", "import", "run the few aten ops without an XPU kernel on CPU instead of raising; torch warns "
                           "once per op that falls back"),
    },
    "rocm": {
        "MIOPEN_FIND_MODE": Recommendation(
            "2", "first-use", "MIOpen FAST find mode: skip the exhaustive convolution search on the first call of "
                              "every new shape (minutes on the first run of a large convolutional model); SD.Next default"),
        "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": Recommendation(
            "1", "first-use", "enable AOTriton fused SDPA kernels on RDNA3/RDNA4 (marked experimental there); "
                              "SD.Next default"),
    },
    "mps": {
        "PYTORCH_ENABLE_MPS_FALLBACK": Recommendation(
            "1", "import", "run ops missing on MPS on CPU instead of raising; torch warns per op"),
    },
    "cuda": {},
    "cpu": {},
    "openvino": {},
}


def recommended(name: str) -> dict[str, Recommendation]:
    return dict(RECOMMENDED.get(name, {}))


def plan(name: str, env: MutableMapping[str, str], *, runtime_started: bool = True) -> list[EnvChange]:
    """What apply_environment would do, without doing it."""
    out = []
    for var, rec in RECOMMENDED.get(name, {}).items():
        prev = env.get(var)
        effective = {"import": False, "device-init": not runtime_started, "first-use": True}[rec.when]
        out.append(EnvChange(var, rec.value, rec.reason, applied=prev is None, previous=prev, when=rec.when,
                             effective_now=effective if prev is None else True))
    return out


def _set(changes: list[EnvChange], env: MutableMapping[str, str]) -> list[EnvChange]:
    for ch in changes:
        if ch.applied:
            env[ch.name] = ch.value
    return changes


def _runtime_started(backend: "Backend") -> bool:
    """Unknown counts as started (the conservative answer)."""
    if backend.name != "xpu":
        return True
    is_init = getattr(backend.torch_mod.xpu, "is_initialized", None)
    return True if is_init is None else bool(is_init())


def apply_environment(backend: "Backend", env: MutableMapping[str, str]) -> list[EnvChange]:
    """Set unset recommended variables in `env`.

    The XPU 4 GiB limit is only considered lifted if the XPU runtime had not started yet: wrongly assuming no
    limit means an OOM, wrongly keeping it only costs attention chunking."""
    started = _runtime_started(backend)
    changes = _set(plan(backend.name, env, runtime_started=started), env)
    late = [c.name for c in changes if c.applied and not c.effective_now]
    if late:
        backend.reasons.append(f"set {', '.join(late)} too late for this process (read at torch import / device "
                               "start); export them before launch, or call cascade_backends.env.apply_early() before "
                               "selecting")
    if backend.name == "xpu" and not started and any(c.applied for c in changes):
        caps, _, _ = capabilities.probe_xpu(backend.torch_mod, backend.index, env)
        backend.capabilities = dataclasses.replace(caps)
    return changes


def build_vendors(torch_mod: Any = None) -> list[str]:
    """Backends this torch *build* could use, decided without touching any device runtime."""
    tm = torch_mod if torch_mod is not None else torch
    version = getattr(tm, "version", None)
    out = []
    if getattr(version, "xpu", None) or "+xpu" in str(getattr(tm, "__version__", "")):
        out.append("xpu")
    if getattr(version, "hip", None):
        out.append("rocm")
    elif getattr(version, "cuda", None):
        out.append("cuda")
    if sys.platform == "darwin":
        out.append("mps")
    return out


def apply_early(env: MutableMapping[str, str] | None = None, torch_mod: Any = None) -> list[EnvChange]:
    """Apply the recommended variables of every vendor this torch build supports, before any device is touched
    (first thing in a CLI; SD.Next's launcher already does the equivalent).  "import"-time variables are still
    too late here (torch is imported); they are set for child processes and reported as not effective."""
    target = os.environ if env is None else env
    changes: list[EnvChange] = []
    for name in build_vendors(torch_mod):
        changes += _set(plan(name, target, runtime_started=False), target)
    return changes
