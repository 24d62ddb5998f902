"""Device backends for the Stable Cascade engine: CUDA, ROCm, XPU (native torch.xpu), MPS, OpenVINO, CPU.

Knows torch (and openvino, imported lazily); knows nothing of Stable Cascade or SD.Next.
"""

from .base import (
    BACKEND_NAMES,
    STAGES,
    Backend,
    BackendUnavailable,
    Capabilities,
    EnvChange,
    MemoryInfo,
    UnsupportedDtype,
)
from .detect import ENV_VAR, available_backends, backend_from_torch_device, parse_request, select_backend

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "STAGES",
    "Backend",
    "BackendUnavailable",
    "Capabilities",
    "EnvChange",
    "MemoryInfo",
    "UnsupportedDtype",
    "available_backends",
    "backend_from_torch_device",
    "parse_request",
    "select_backend",
]
