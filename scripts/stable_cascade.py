"""SD.Next entry point of the Stable Cascade extension. No logic here: see extension/entry.py.

SD.Next puts the extension root on sys.path only while this file is imported, so the three packages are imported
now (later imports of their submodules go through the packages themselves). Their names are generic, so each is
checked to come from this repository: another extension or library that already claimed the name fails loudly.
"""

import importlib
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_own(name):
    module = importlib.import_module(name)
    origin = os.path.dirname(os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or "")))
    if os.path.realpath(origin) != os.path.realpath(_ROOT):
        raise ImportError(
            f"Stable Cascade extension: the module name {name!r} is already taken by "
            f"{getattr(module, '__file__', module)!r} (another extension or an installed package), so this "
            f"extension's {name}/ package in {_ROOT} cannot be loaded. Disable the other extension or uninstall "
            f"the package that provides {name!r}."
        )
    return module


for _name in ("backends", "cascade", "extension"):
    _import_own(_name)

from extension import entry  # noqa: E402

entry.register()
StableCascadePromptText = entry.prompt_text_script()
del _name
