"""Memory queries, synchronize and empty_cache: the one place that knows each vendor's memory API.

XPU: torch.xpu.mem_get_info reports total memory as free on many drivers (pytorch#161381) or raises
(pytorch#164429), so free = total - reserved, as SD.Next and ComfyUI do.  This only sees *this* process.
CPU / OpenVINO: host RAM via psutil (OpenVINO owns its device memory; torch cannot see it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .types import MemoryInfo

if TYPE_CHECKING:
    from .base import Backend

# Which torch submodule carries the caching-allocator API for each backend.
_ALLOCATOR_MODULE = {"cuda": "cuda", "rocm": "cuda", "xpu": "xpu"}


def _accel(backend: "Backend") -> Any | None:
    attr = _ALLOCATOR_MODULE.get(backend.name)
    return getattr(backend.torch_mod, attr) if attr else None


def _host() -> MemoryInfo:
    import psutil

    vm = psutil.virtual_memory()
    return MemoryInfo(total=int(vm.total), free=int(vm.available))


def memory_info(backend: "Backend") -> MemoryInfo:
    idx = backend.index
    mod = _accel(backend)
    if backend.name in ("cuda", "rocm"):
        free, total = mod.mem_get_info(idx)
        return MemoryInfo(total=int(total), free=int(free), allocated=int(mod.memory_allocated(idx)),
                          reserved=int(mod.memory_reserved(idx)), peak=int(mod.max_memory_allocated(idx)))
    if backend.name == "xpu":
        total = backend.capabilities.total_memory
        if total is None:
            total = int(mod.get_device_properties(idx).total_memory)
        reserved = int(mod.memory_reserved(idx))
        return MemoryInfo(total=int(total), free=int(total) - reserved, allocated=int(mod.memory_allocated(idx)),
                          reserved=reserved, peak=int(mod.max_memory_allocated(idx)))
    if backend.name == "mps":
        mps = backend.torch_mod.mps
        total = backend.capabilities.total_memory
        if total is None:
            total = int(mps.recommended_max_memory())
        driver = int(mps.driver_allocated_memory())
        # Unified memory: "free" is the Metal working-set budget left to this process.
        return MemoryInfo(total=total, free=max(total - driver, 0), allocated=int(mps.current_allocated_memory()),
                          reserved=driver, peak=None)
    return _host()  # cpu, openvino


def reset_peak(backend: "Backend") -> None:
    mod = _accel(backend)
    if mod is not None:
        mod.reset_peak_memory_stats(backend.index)


def synchronize(backend: "Backend") -> None:
    mod = _accel(backend)
    if mod is not None:
        mod.synchronize(backend.index)
    elif backend.name == "mps":
        backend.torch_mod.mps.synchronize()


def empty_cache(backend: "Backend") -> None:
    mod = _accel(backend)
    if mod is not None:
        mod.empty_cache()
    elif backend.name == "mps":
        backend.torch_mod.mps.empty_cache()
