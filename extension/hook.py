"""The extension's one hook into SD.Next: a wrap of `pipelines.model_stablecascade.load_cascade_combined`.

SD.Next has no API to register a model loader (reference/sdnext.md §0, §2.5). `modules.sd_models.load_diffuser_force`
imports `load_cascade_combined` from its module at every "Stable Cascade" load, so replacing that module attribute
routes every Stable Cascade load through `extension.loader.load`, which handles our models and hands everything else
to the original. Installing twice keeps one wrap; `uninstall()` restores the original.
"""

from __future__ import annotations

import functools
from typing import Callable

TARGET_MODULE = "pipelines.model_stablecascade"
TARGET_NAME = "load_cascade_combined"
_MARK = "__sd_cascade_original__"


def _module():
    import importlib

    return importlib.import_module(TARGET_MODULE)


def install(default_decoder: Callable[[], str | None]) -> None:
    """Wrap SD.Next's loader (idempotent). `default_decoder()` reads the setting at load time."""
    from . import loader

    module = _module()
    current = getattr(module, TARGET_NAME)
    original = getattr(current, _MARK, current)

    @functools.wraps(original)
    def load_cascade_combined(checkpoint_info, diffusers_load_config=None):
        return loader.load(checkpoint_info, diffusers_load_config, original, default_decoder())

    setattr(load_cascade_combined, _MARK, original)
    setattr(module, TARGET_NAME, load_cascade_combined)


def uninstall() -> None:
    """Put SD.Next's original loader back (no-op when not installed)."""
    module = _module()
    current = getattr(module, TARGET_NAME)
    original = getattr(current, _MARK, None)
    if original is not None:
        setattr(module, TARGET_NAME, original)


def installed() -> bool:
    return hasattr(getattr(_module(), TARGET_NAME), _MARK)
