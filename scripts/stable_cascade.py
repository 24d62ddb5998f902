"""SD.Next entry point of the Stable Cascade extension. Only package loading here; the registration is extension/entry.py.

SD.Next (modules/scripts_manager.py `load_scripts`) puts this extension's root first on sys.path only while this
file runs (script_loading.load_module), and every extension shares one `sys.modules`. So our top-level names must
neither be taken by another extension's packages nor take theirs:
- the engine `cascade` and the device layer `cascade_backends` have names of their own; they are imported now, while
  the root is on sys.path (their submodules are found later through the packages), and each is checked to come from
  this folder: a module of that name from elsewhere (another extension, an installed copy) fails loudly;
- the SD.Next glue in extension/ is loaded by file location under the name `cascade_sdnext` (its modules import
  one another relatively), so the generic name `extension` stays free for other extensions, and theirs cannot
  shadow ours.
"""

import importlib
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = "cascade_sdnext"  # the import name of extension/ inside SD.Next


def _from_here(module) -> bool:
    path = getattr(module, "__file__", None) or ""
    return bool(path) and os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(path)))) == \
        os.path.realpath(_ROOT)


def _refuse(name, module):
    raise ImportError(
        f"Stable Cascade extension: the module name {name!r} is already taken by "
        f"{getattr(module, '__file__', None) or module!r} (another extension or an installed package), so this "
        f"extension's package in {_ROOT} cannot be loaded. Disable the other extension or uninstall the package that "
        f"provides {name!r}."
    )


def _import_own(name):
    module = importlib.import_module(name)
    if not _from_here(module):
        _refuse(name, module)
    return module


def _load_glue():
    """extension/ as `cascade_sdnext`, by file location (the importlib recipe for importing a source file directly)."""
    module = sys.modules.get(GLUE)
    if module is not None:  # a script reload: keep the loaded package (its hook and callbacks refer to it)
        if not _from_here(module):
            _refuse(GLUE, module)
        return module
    init = os.path.join(_ROOT, "extension", "__init__.py")
    spec = importlib.util.spec_from_file_location(GLUE, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[GLUE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[GLUE]
        raise
    return module


_import_own("cascade_backends")
_import_own("cascade")
_load_glue()
entry = importlib.import_module(GLUE + ".entry")

entry.register()
StableCascadePromptText = entry.prompt_text_script()
