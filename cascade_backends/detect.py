"""Backend detection and selection.  The only module that asks torch which vendor is present.

Order (auto): XPU before CUDA (inside SD.Next torch.cuda is aliased to torch.xpu on Arc), then ROCm/CUDA told
apart by torch.version.hip (ROCm's torch device is still "cuda"), then MPS, then CPU.  OpenVINO is never chosen
automatically: only when asked for (--device openvino[:DEV], CASCADE_DEVICE, or a host's own choice through
`backend_from_torch_device`).

Every function takes the torch-like module (`torch_mod`) and OpenVINO core (`ov_core`) as optional parameters so
that tests can pass stand-ins instead of patching torch.  A requested backend that is unavailable raises
BackendUnavailable; nothing silently falls back.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch

from . import capabilities as caps_mod
from . import ipex
from . import openvino as ov_mod
from .base import Backend
from .types import BACKEND_NAMES, BackendUnavailable

ENV_VAR = "CASCADE_DEVICE"
# Request aliases, the vendor names people type: ipex -> xpu, zluda -> cuda, hip -> rocm, ov -> openvino.
_ALIASES = {"ipex": "xpu", "zluda": "cuda", "hip": "rocm", "ov": "openvino"}
_AUTO_ORDER = ("xpu", "rocm", "cuda", "mps", "cpu")

_TORCH_HINT = {
    "cuda": "install a CUDA build of torch (https://download.pytorch.org/whl/cu128 or newer) and an NVIDIA driver",
    "rocm": "install a ROCm build of torch (https://download.pytorch.org/whl/rocm7.2 or newer) on a supported "
            "AMD GPU/driver",
    "xpu": "install the XPU build of torch (https://download.pytorch.org/whl/xpu) and the Intel GPU driver "
           "(Level Zero: libze1 + libze-intel-gpu1 on Linux, the Arc driver on Windows); IPEX is not needed",
    "mps": "needs Apple silicon, macOS >= 12.3 and a torch build with MPS (the default macOS arm64 wheel)",
}


def parse_request(requested: str | None) -> tuple[str, int | None, str | None]:
    """'cuda:1' -> ('cuda', 1, None); 'openvino:GPU.1' -> ('openvino', None, 'GPU.1'); None/'auto' -> ('auto', ...)."""
    if requested is None or not str(requested).strip():
        return "auto", None, None
    text = str(requested).strip()
    head, _, tail = text.partition(":")
    name = _ALIASES.get(head.lower(), head.lower())
    if name == "auto":
        return "auto", None, None
    if name not in BACKEND_NAMES:
        raise BackendUnavailable(f"unknown device {requested!r}; use one of: auto, {', '.join(BACKEND_NAMES)} "
                                 "(with ':N' for a device index, or 'openvino:GPU.1' for an OpenVINO device)")
    if name == "openvino":
        return name, None, (tail.upper() or None)
    if not tail:
        return name, None, None
    if not tail.isdigit():
        raise BackendUnavailable(f"bad device index in {requested!r}: expected e.g. '{name}:1'")
    return name, int(tail), None


def _version(tm: Any, attr: str) -> str | None:
    v = getattr(getattr(tm, "version", None), attr, None)
    return str(v) if v else None


def _hijacked(tm: Any) -> bool:
    """SD.Next's ipex_init aliases torch.cuda to torch.xpu and marks it."""
    return bool(getattr(getattr(tm, "cuda", None), "is_xpu_hijacked", False))


def _count(mod: Any) -> int:
    try:
        return int(mod.device_count())
    except Exception:  # noqa: BLE001
        return 0


def why_unavailable(name: str, tm: Any, index: int = 0, *, ov_core: Any = None) -> str | None:
    """None when `name` can be used on this machine, else the reason and what to install."""
    tv = str(getattr(tm, "__version__", "?"))
    if name == "cpu":
        return None
    if name == "openvino":
        if ov_core is None and not ov_mod.is_available():
            return f"the openvino package is not installed: {ov_mod.INSTALL_HINT}"
        return None
    if name == "xpu":
        xpu = getattr(tm, "xpu", None)
        if xpu is None:
            return f"torch {tv} has no torch.xpu module (torch >= 2.5 needed); {_TORCH_HINT['xpu']}"
        if not xpu.is_available():
            where = "driver/runtime not found" if "+xpu" in tv else "torch is not an XPU build"
            return f"torch.xpu.is_available() is False ({where}); {_TORCH_HINT['xpu']}"
        n = _count(xpu)
        return None if index < n else f"xpu:{index} requested but only {n} XPU device(s) are visible"
    if name in ("cuda", "rocm"):
        hip, cuda = _version(tm, "hip"), _version(tm, "cuda")
        if _hijacked(tm):
            return ("torch.cuda is SD.Next's alias of torch.xpu here (Intel GPU): request 'xpu' instead")
        if name == "rocm" and hip is None:
            return f"torch {tv} is not a ROCm build (torch.version.hip is None); {_TORCH_HINT['rocm']}"
        if name == "cuda" and cuda is None and hip is None:
            return f"torch {tv} was built without CUDA (torch.version.cuda is None); {_TORCH_HINT['cuda']}"
        if not tm.cuda.is_available():
            return (f"torch.cuda.is_available() is False (no {'AMD' if hip else 'NVIDIA'} GPU visible: check the "
                    f"driver and {'HIP_VISIBLE_DEVICES' if hip else 'CUDA_VISIBLE_DEVICES'})")
        n = _count(tm.cuda)
        return None if index < n else f"{name}:{index} requested but only {n} device(s) are visible"
    if name == "mps":
        mps = getattr(getattr(tm, "backends", None), "mps", None)
        if mps is None or not mps.is_available():
            built = bool(mps is not None and mps.is_built())
            return f"MPS is not available ({'no Apple GPU / macOS < 12.3' if built else 'torch built without MPS'}); " \
                   f"{_TORCH_HINT['mps']}"
        return None
    raise BackendUnavailable(f"unknown backend {name!r}")


# --- builders: one per backend, each returns a fully described Backend ------------------------------------
def _build_cuda(tm: Any, index: int, env: Mapping[str, str], *, rocm: bool) -> Backend:
    if rocm:
        caps, arch, flavor = caps_mod.probe_rocm(tm, index)
    else:
        caps, arch, flavor = caps_mod.probe_cuda(tm, index)
    dev_name = str(tm.cuda.get_device_properties(index).name)
    b = Backend(name="rocm" if rocm else "cuda", device=torch.device("cuda", index),
                description=f"{dev_name} ({arch}, {'HIP ' + str(_version(tm, 'hip')) if rocm else 'CUDA ' + str(_version(tm, 'cuda'))})",
                capabilities=caps, arch=arch, flavor=flavor, torch_mod=tm)
    if rocm:
        has = caps_mod.rocm_has_kernels(tm, arch)
        if has is False:
            built = ", ".join(caps_mod.gfx_base(a) for a in tm.cuda.get_arch_list())
            b.warnings.append(
                f"torch {tm.__version__} has no kernels for {arch} (built for: {built}); kernels will fail or run "
                "as the wrong ISA. Install a wheel built for your gfx target (AMD TheRock nightlies cover gfx110X/"
                "gfx120X/gfx1151); HSA_OVERRIDE_GFX_VERSION spoofing can hang the GPU")
        if env.get("HSA_OVERRIDE_GFX_VERSION"):
            b.reasons.append(f"HSA_OVERRIDE_GFX_VERSION={env['HSA_OVERRIDE_GFX_VERSION']}: the runtime reports "
                             f"{arch}, not the physical chip")
    if flavor == "zluda":
        b.reasons.append("ZLUDA detected (device name ends with [ZLUDA]): CUDA wheel running on an AMD GPU")
    return b


def _build_xpu(tm: Any, index: int, env: Mapping[str, str]) -> Backend:
    caps, arch, _ = caps_mod.probe_xpu(tm, index, env)
    props = tm.xpu.get_device_properties(index)
    drv = getattr(props, "driver_version", None)
    b = Backend(name="xpu", device=torch.device("xpu", index),
                description=f"{props.name} (XPU{', driver ' + str(drv) if drv else ''})",
                capabilities=caps, arch=arch, torch_mod=tm)
    st = ipex.maybe_import(str(getattr(tm, "__version__", ""))) if tm is torch else \
        ipex.status(str(getattr(tm, "__version__", "")), probe=False)
    b.reasons.append(f"IPEX: {st.reason}")
    return b


def _build_mps(tm: Any, env: Mapping[str, str]) -> Backend:
    caps, arch, _ = caps_mod.probe_mps(tm)
    return Backend(name="mps", device=torch.device("mps"), description=f"{arch} (MPS)", capabilities=caps,
                   arch=arch, torch_mod=tm)


def _host_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001
        return None


def _build_cpu(tm: Any, env: Mapping[str, str]) -> Backend:
    caps, arch, _ = caps_mod.probe_cpu(tm, _host_memory())
    return Backend(name="cpu", device=torch.device("cpu"), description=f"{arch} (CPU, {os.cpu_count()} threads)",
                   capabilities=caps, arch=arch, torch_mod=tm)


def _build_openvino(tm: Any, ov_device: str | None, ov_core: Any) -> Backend:
    core = ov_core if ov_core is not None else ov_mod.core()
    dev = ov_mod.resolve_device(core, ov_device)
    caps, full_name, _ = caps_mod.probe_openvino(core, dev, _host_memory())
    b = Backend(name="openvino", device=torch.device("cpu"), description=f"{full_name} (OpenVINO {dev})",
                capabilities=caps, arch=full_name, ov_device=dev, torch_mod=tm)
    b.reasons.append(f"OpenVINO device {dev}" + ("" if ov_device else " (default: discrete GPU if present, "
                                                                    "else CPU)") + "; torch tensors stay on CPU")
    return b


def _build(name: str, tm: Any, index: int, env: Mapping[str, str], ov_device: str | None, ov_core: Any) -> Backend:
    builders: dict[str, Callable[[], Backend]] = {
        "cuda": lambda: _build_cuda(tm, index, env, rocm=False),
        "rocm": lambda: _build_cuda(tm, index, env, rocm=True),
        "xpu": lambda: _build_xpu(tm, index, env),
        "mps": lambda: _build_mps(tm, env),
        "cpu": lambda: _build_cpu(tm, env),
        "openvino": lambda: _build_openvino(tm, ov_device, ov_core),
    }
    return builders[name]()


# --- public API -----------------------------------------------------------------------------------------
def select_backend(requested: str | None = None, *, env: Mapping[str, str] = os.environ, torch_mod: Any = None,
                   ov_core: Any = None) -> Backend:
    """Pick the backend.  `requested` (e.g. from --device) wins; else $CASCADE_DEVICE; else auto-detection."""
    tm = torch_mod if torch_mod is not None else torch
    source = "--device"
    if requested is None or str(requested).strip().lower() in ("", "auto"):
        requested, source = env.get(ENV_VAR) or None, f"${ENV_VAR}"
    name, index, ov_device = parse_request(requested)
    if name == "auto":
        return _auto(tm, env, ov_core)
    if name == "cuda" and _version(tm, "hip") is not None and not _hijacked(tm):
        name = "rocm"  # "cuda" on a ROCm build means the AMD GPU (its torch device *is* cuda)
    reason = why_unavailable(name, tm, index or 0, ov_core=ov_core)
    if reason is not None:
        raise BackendUnavailable(f"{requested!r} requested via {source} is unavailable: {reason}")
    b = _build(name, tm, index or 0, env, ov_device, ov_core)
    b.reasons.insert(0, f"requested {requested!r} via {source}")
    return b


def _auto(tm: Any, env: Mapping[str, str], ov_core: Any) -> Backend:
    skipped = []
    for name in _AUTO_ORDER:
        if name == "cuda" and _version(tm, "hip") is not None:
            continue  # ROCm build: handled as "rocm"
        if name == "rocm" and _version(tm, "hip") is None:
            continue
        reason = why_unavailable(name, tm, 0, ov_core=ov_core)
        if reason is None:
            b = _build(name, tm, 0, env, None, ov_core)
            b.reasons.insert(0, "auto: first available in order xpu > rocm/cuda > mps > cpu"
                                + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
            return b
        if name != "cpu":
            skipped.append(f"{name}: {reason.split(';')[0]}")
    raise AssertionError("unreachable: cpu is always available")


def available_backends(*, env: Mapping[str, str] = os.environ, torch_mod: Any = None,
                       ov_core: Any = None) -> list[Backend]:
    """Every usable target, one per device (cuda:0, cuda:1, ..., openvino:CPU, openvino:GPU.1, cpu)."""
    tm = torch_mod if torch_mod is not None else torch
    out: list[Backend] = []
    for name in ("xpu", "rocm", "cuda", "mps"):
        if why_unavailable(name, tm, 0, ov_core=ov_core) is not None:
            continue
        n = _count(tm.xpu if name == "xpu" else tm.cuda) if name != "mps" else 1
        for i in range(max(n, 1)):
            out.append(_build(name, tm, i, env, None, ov_core))
    if why_unavailable("openvino", tm, ov_core=ov_core) is None:
        core = ov_core if ov_core is not None else ov_mod.core()
        for dev in ov_mod.devices(core):
            out.append(_build("openvino", tm, 0, env, dev, core))
    out.append(_build("cpu", tm, 0, env, None, ov_core))
    return out


def backend_from_torch_device(device: torch.device | str, *, backend_name: str | None = None,
                              ov_device: str | None = None, env: Mapping[str, str] = os.environ,
                              torch_mod: Any = None, ov_core: Any = None) -> Backend:
    """Describe a device someone else chose (a host application that owns device selection).

    `backend_name` is one of BACKEND_NAMES; with it the vendor is taken as given and torch.cuda is not probed to
    find out (a host may have aliased torch.cuda to torch.xpu on Intel).  Without it the vendor comes from the
    device type (+ torch.version.hip).  Translating a host's own backend names is the host glue's job."""
    tm = torch_mod if torch_mod is not None else torch
    dev = torch.device(device) if isinstance(device, str) else device
    if backend_name is not None:
        if backend_name not in BACKEND_NAMES:
            raise BackendUnavailable(f"unknown backend {backend_name!r}; expected one of {', '.join(BACKEND_NAMES)}")
        name = backend_name
    else:
        name = {"xpu": "xpu", "mps": "mps", "cpu": "cpu"}.get(dev.type)
        if dev.type == "cuda":
            name = "xpu" if _hijacked(tm) else ("rocm" if _version(tm, "hip") is not None else "cuda")
        if name is None:
            raise BackendUnavailable(f"unsupported torch device type {dev.type!r}")
    if name == "openvino":
        b = _build("openvino", tm, 0, env, ov_device, ov_core)
    else:
        index = dev.index or 0
        if name in ("cuda", "rocm", "xpu") and dev.type not in ("cuda", "xpu"):
            raise BackendUnavailable(f"backend {backend_name!r} does not match torch device {dev}")
        b = _build(name, tm, index, env, None, ov_core)
    b.reasons.insert(0, f"given by host: device={dev}" + (f", backend={backend_name}" if backend_name else ""))
    return b
