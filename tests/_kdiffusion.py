"""Test-only loader for k-diffusion's reference samplers (``k_diffusion/sampling.py``).

Why not ``import k_diffusion.sampling``: the package's ``__init__`` eagerly imports its training/evaluation helpers
(torchvision, scikit-image, clean-fid, ...), which are broken or absent here, while ``sampling.py`` itself needs only
torch, scipy, torchsde, torchdiffeq, tqdm and ``utils.append_dims``. So the file is executed as the ``sampling``
submodule of a stand-in package whose ``utils`` provides just ``append_dims``; the k-diffusion code runs unmodified.
The engine (``cascade/``) never imports k-diffusion; it is an independent implementation to compare against.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

_PACKAGE = "_kdiffusion_standin"


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions until `x` has `target_dims` dimensions (k-diffusion's utils helper)."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def load() -> types.ModuleType:
    """k-diffusion's ``sampling`` module, loaded once per process."""
    name = f"{_PACKAGE}.sampling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("k_diffusion")  # locating a top-level package does not execute its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (test-only dependency: pip install --no-deps k-diffusion)")
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"

    package = types.ModuleType(_PACKAGE)
    package.__path__ = []  # a package, so "from . import utils" resolves against it
    utils = types.ModuleType(f"{_PACKAGE}.utils")
    utils.append_dims = append_dims
    package.utils = utils
    sys.modules[_PACKAGE] = package
    sys.modules[utils.__name__] = utils

    file_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = module
    file_spec.loader.exec_module(module)
    return module
