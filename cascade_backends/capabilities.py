"""Capability probing, one function per vendor.  This is the only place that decides bf16/fp16/fp64/alloc limits.

Every probe takes the torch-like module as a parameter so tests can pass a stand-in instead of patching torch.
Rules (see README.md here and shared/reference/backends.md):
  * CUDA: bf16 iff compute capability >= 8.0 (is_bf16_supported() also reports emulated bf16, so it is not used).
  * ROCm: bf16 only on CDNA (gfx908/90a/942/950) and RDNA3+ (gfx11xx, gfx12xx); fp16 off on gfx1102 (segfaults).
  * XPU: bf16 iff bf16 conversions *and* DPAS/XMX matrix engines; no fp64 on Alchemist; 4 GiB single allocation
    on pre-Xe2 parts unless UR_L0_ENABLE_RELAXED_ALLOCATION_LIMITS=1.
  * CPU: bf16/fp16 only with native instructions (AVX512-BF16/AMX, ARM bf16); else fp32.
  * MPS: bf16 kernels need macOS 14; no fp64.
  * OpenVINO: never bf16 (SD.Next treats it as unsupported too); fp16 if the OV device lists FP16.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from .types import Capabilities, GiB

# --- NVIDIA ---------------------------------------------------------------------------------------------
# Turing parts without usable fp16 tensor throughput / known fp16 problems (the list ComfyUI also keeps).
_NVIDIA_FP16_BROKEN = ("GTX 1660", "GTX 1650", "GTX 1630", "T500", "T550", "T600", "T1000", "T1200", "T2000",
                       "MX450", "MX550", "CMP 30HX")


def probe_cuda(tm: Any, index: int) -> tuple[Capabilities, str, str | None]:
    """Returns (capabilities, arch like 'sm_86', flavor).  ZLUDA reports a fake capability (8, 8)."""
    props = tm.cuda.get_device_properties(index)
    cc = (int(props.major), int(props.minor))
    name = str(props.name)
    zluda = name.endswith("[ZLUDA]")
    notes = []
    if zluda:
        bf16 = False
        notes.append("ZLUDA reports compute capability 8.8 for any AMD card: bf16 not claimed")
    else:
        bf16 = cc >= (8, 0)
        notes.append(f"bf16 {'native' if bf16 else 'not native'}: compute capability {cc[0]}.{cc[1]} "
                     f"{'>=' if bf16 else '<'} 8.0")
    fp16 = cc >= (5, 3) and not any(s in name for s in _NVIDIA_FP16_BROKEN)
    if not fp16:
        notes.append(f"fp16 disabled: {name} has no reliable fp16")
    caps = Capabilities(bf16=bf16, fp16=fp16, fp64=True, max_alloc_bytes=None,
                        total_memory=int(props.total_memory), notes=tuple(notes))
    return caps, f"sm_{cc[0]}{cc[1]}", ("zluda" if zluda else None)


# --- AMD ROCm -------------------------------------------------------------------------------------------
_ROCM_BF16_CDNA = ("gfx908", "gfx90a", "gfx942", "gfx950")


def gfx_base(arch: str) -> str:
    """'gfx90a:sramecc+:xnack-' -> 'gfx90a'."""
    return arch.split(":", 1)[0].strip().lower()


def rocm_bf16(arch: str) -> bool:
    a = gfx_base(arch)
    return a in _ROCM_BF16_CDNA or bool(re.fullmatch(r"gfx1[12][0-9a-f]{2}", a))


def probe_rocm(tm: Any, index: int) -> tuple[Capabilities, str, str | None]:
    props = tm.cuda.get_device_properties(index)
    arch = gfx_base(str(getattr(props, "gcnArchName", "") or "unknown"))
    bf16 = rocm_bf16(arch)
    fp16 = arch != "gfx1102"
    notes = [f"bf16 {'native' if bf16 else 'not native'} on {arch} (native only on CDNA gfx908/90a/942/950, "
             "RDNA3 gfx11xx, RDNA4 gfx12xx)"]
    if not fp16:
        notes.append("fp16 disabled on gfx1102 (known segfaults, SD.Next does the same)")
    caps = Capabilities(bf16=bf16, fp16=fp16, fp64=True, max_alloc_bytes=None,
                        total_memory=int(props.total_memory), notes=tuple(notes))
    return caps, arch, None


def rocm_has_kernels(tm: Any, arch: str) -> bool | None:
    """True/False if the torch wheel was/wasn't built for this gfx target; None when the list is unavailable."""
    try:
        built = [gfx_base(a) for a in tm.cuda.get_arch_list()]
    except Exception:  # noqa: BLE001 - older/odd builds: unknown, not an error
        return None
    if not built:
        return None
    return gfx_base(arch) in built


# --- Intel XPU ------------------------------------------------------------------------------------------
# Parts known to allocate > 4 GiB without the Level Zero relaxed-limits switch (Xe2 and newer).
# Everything else (Alchemist DG2, Xe-LP/Xe-LPG iGPUs) is treated as 4 GiB-limited: being wrong there only
# costs some attention chunking, being wrong the other way is an OOM/crash.
_XPU_UNLIMITED_NAME = re.compile(r"Arc\(TM\) (Pro )?B\d|Arc\(TM\) 1[34]0V|Arc\(TM\) B\d{3}|Data Center GPU Max",
                                 re.IGNORECASE)
_XPU_UNLIMITED_IDS = (range(0xE200, 0xE300), range(0x6400, 0x6500), range(0xB080, 0xB0C0))
_XPU_ALCHEMIST = re.compile(r"Arc\(TM\) (Pro )?A\d{2,3}", re.IGNORECASE)
_XPU_ALCHEMIST_IDS = range(0x5690, 0x56D0)
XPU_ALLOC_LIMIT = 4 * GiB
RELAXED_ENV = "UR_L0_ENABLE_RELAXED_ALLOCATION_LIMITS"


def xpu_is_alchemist(name: str, device_id: int | None) -> bool:
    return bool(_XPU_ALCHEMIST.search(name)) or (device_id is not None and device_id in _XPU_ALCHEMIST_IDS)


def xpu_alloc_limited(name: str, device_id: int | None) -> bool:
    if _XPU_UNLIMITED_NAME.search(name):
        return False
    if device_id is not None and any(device_id in r for r in _XPU_UNLIMITED_IDS):
        return False
    return True


def probe_xpu(tm: Any, index: int, env: Mapping[str, str]) -> tuple[Capabilities, str, str | None]:
    props = tm.xpu.get_device_properties(index)
    name = str(props.name)
    device_id = getattr(props, "device_id", None)
    conversions = bool(getattr(props, "has_bfloat16_conversions", False))
    dpas = getattr(props, "has_subgroup_matrix_multiply_accumulate", None)
    if dpas is None:  # older torch: fall back to the non-emulated query
        dpas = bool(tm.xpu.is_bf16_supported(including_emulation=False))
    bf16 = conversions and bool(dpas)
    notes = [f"bf16 {'native' if bf16 else 'not native'}: bf16 conversions={conversions}, XMX/DPAS={bool(dpas)} "
             "(torch.xpu.is_bf16_supported() counts emulation, not used)"]
    fp16 = bool(getattr(props, "has_fp16", True))
    fp64 = bool(getattr(props, "has_fp64", False))
    if not fp64:
        notes.append("no fp64 on this device: keep scheduler math in fp32 or on CPU")
    max_alloc: int | None = None
    if xpu_alloc_limited(name, device_id):
        if env.get(RELAXED_ENV, "") == "1":
            notes.append(f"{RELAXED_ENV}=1: allocations over 4 GiB allowed (kernels built for >4 GiB addressing, "
                         "possibly slower on Alchemist)")
        else:
            max_alloc = XPU_ALLOC_LIMIT
            notes.append(f"single allocations limited to 4 GiB (set {RELAXED_ENV}=1 to lift, at some speed cost)")
    caps = Capabilities(bf16=bf16, fp16=fp16, fp64=fp64, max_alloc_bytes=max_alloc,
                        total_memory=int(props.total_memory), notes=tuple(notes))
    return caps, name, None


# --- Apple MPS ------------------------------------------------------------------------------------------
def probe_mps(tm: Any) -> tuple[Capabilities, str, str | None]:
    mps_backend = tm.backends.mps
    try:
        bf16 = bool(mps_backend.is_macos_or_newer(14, 0))
    except Exception:  # noqa: BLE001 - very old torch without the helper
        bf16 = False
    total = None
    try:
        total = int(tm.mps.recommended_max_memory())
    except Exception:  # noqa: BLE001
        pass
    name = "Apple GPU"
    try:
        name = str(mps_backend.get_name())
    except Exception:  # noqa: BLE001
        pass
    notes = (f"bf16 {'available (macOS >= 14)' if bf16 else 'unavailable (needs macOS 14)'}; no fp64 on MPS",)
    return Capabilities(bf16=bf16, fp16=True, fp64=False, max_alloc_bytes=None, total_memory=total,
                        notes=notes), name, None


# --- CPU ------------------------------------------------------------------------------------------------
def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> dict[str, bool]:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return {f: True for f in line.split(":", 1)[1].split()}
    except OSError:
        pass
    return {}


def cpu_features(tm: Any) -> Mapping[str, Any]:
    """torch.cpu.get_capabilities() (torch >= 2.10) or /proc/cpuinfo flags with the same key names."""
    get = getattr(getattr(tm, "cpu", None), "get_capabilities", None)
    if get is not None:
        try:
            return dict(get())
        except Exception:  # noqa: BLE001
            pass
    flags = _cpuinfo_flags()
    return {**flags, "avx512_bf16": flags.get("avx512_bf16", False), "amx_bf16": flags.get("amx_bf16", False),
            "avx512_fp16": flags.get("avx512_fp16", False), "amx_fp16": flags.get("amx_fp16", False),
            "bf16": flags.get("bf16", False), "fp16_arith": flags.get("asimdhp", False)}


def probe_cpu(tm: Any, total_memory: int | None) -> tuple[Capabilities, str, str | None]:
    f = cpu_features(tm)
    bf16_flags = [k for k in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16") if f.get(k)]
    fp16_flags = [k for k in ("amx_fp16", "avx512_fp16", "fp16_arith") if f.get(k)]
    bf16, fp16 = bool(bf16_flags), bool(fp16_flags)
    notes = (f"bf16 {'native (' + ', '.join(bf16_flags) + ')' if bf16 else 'not native (no AMX/AVX512-BF16)'}",
             f"fp16 {'native (' + ', '.join(fp16_flags) + ')' if fp16 else 'not native'}")
    name = str(f.get("cpu_name") or f.get("architecture") or "cpu")
    return Capabilities(bf16=bf16, fp16=fp16, fp64=True, max_alloc_bytes=None, total_memory=total_memory,
                        notes=notes), name, None


# --- OpenVINO -------------------------------------------------------------------------------------------
def probe_openvino(core: Any, ov_device: str, host_total: int | None) -> tuple[Capabilities, str, str | None]:
    """`core` is an openvino.Core (or stand-in).  bf16 is never claimed, matching SD.Next."""
    try:
        opt = [str(x) for x in core.get_property(ov_device, "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # noqa: BLE001
        opt = []
    try:
        name = str(core.get_property(ov_device, "FULL_DEVICE_NAME"))
    except Exception:  # noqa: BLE001
        name = ov_device
    total = host_total
    if ov_device.startswith("GPU"):
        try:
            total = int(core.get_property(ov_device, "GPU_DEVICE_TOTAL_MEM_SIZE"))
        except Exception:  # noqa: BLE001
            total = None
    fp16 = "FP16" in opt
    notes = ("bf16 not claimed on OpenVINO (inference precision is an OpenVINO hint, SD.Next does the same)",
             f"OPTIMIZATION_CAPABILITIES={','.join(opt) or 'unknown'}")
    return Capabilities(bf16=False, fp16=fp16, fp64=False, max_alloc_bytes=None, total_memory=total,
                        notes=notes), name, None
