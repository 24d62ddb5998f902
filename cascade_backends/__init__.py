"""The device layer: CUDA, ROCm, XPU (native torch.xpu), MPS, OpenVINO, CPU behind one `Backend` value.

Knows torch (and openvino, imported lazily); knows nothing of Stable Cascade or SD.Next: it answers what a device
can do (capabilities, dtypes it runs, memory, attention budget, environment, OpenVINO compilation), and the engine
decides what each model part runs in (`cascade.precision`). The import name is unique on purpose (not `backends`):
inside SD.Next every extension shares one `sys.modules`, and an installed distribution shares `site-packages`.
"""

from .base import Backend
from .detect import ENV_VAR, available_backends, backend_from_torch_device, parse_request, select_backend
from .types import (
    BACKEND_NAMES,
    GiB,
    AttentionPolicy,
    BackendUnavailable,
    Capabilities,
    EnvChange,
    MemoryInfo,
    UnsupportedDtype,
)

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "GiB",
    "AttentionPolicy",
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
