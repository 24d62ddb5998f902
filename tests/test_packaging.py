"""The repository as a distribution (`pip install <repo>`) and as an SD.Next extension among others.

Installable: a wheel is built from a copy of the work tree (so the build's egg-info stays out of the shared tree),
installed with --no-deps into a target folder, and `python -m cascade` and the `stable-cascade` script run from
another folder with only that target on PYTHONPATH.

Names inside SD.Next: SD.Next loads every extension's scripts/*.py into one interpreter, with the extension's root
first on sys.path only while that file is imported (modules/scripts_manager.py `load_scripts`: `sys.path =
[scriptfile.basedir] + sys.path`, then `script_loading.load_module(path)`, which is `spec_from_file_location(
basename, path)` + `exec_module`, then `sys.path = syspath`). A dummy extension with its own generic `backends` and
`extension` packages is loaded before ours, then after ours: each must keep getting its own modules, at import
time and later at run time (lazy imports inside functions, when no extension root is on sys.path any more).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"cascade", "cascade_backends"} | ({"serving"} if (ROOT / "serving" / "__init__.py").is_file() else set())
_SKIP = shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".pytest_cache", "*.egg-info", "build", "dist",
                               ".cache", "out*.png")


def _run(args, *, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _pip(*args, cwd) -> subprocess.CompletedProcess:
    out = _run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(tmp / "wheels"), ".", cwd=src)
    (found,) = (tmp / "wheels").glob("*.whl")
    return found


@pytest.fixture(scope="module")
def target(wheel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site") / "target"
    _pip("install", "--no-deps", "--no-index", "--quiet", "--target", str(folder), str(wheel), cwd=wheel.parent)
    return folder


def _only(target: Path) -> dict[str, str]:
    """The environment with the install target as the only extra import path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    return env


def test_wheel_holds_the_engine_and_its_data_not_the_sdnext_glue(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == TOP_LEVEL  # no tests/, extension/, scripts/, benchmarks/, and no generic `backends`
    for needed in ("cascade/__main__.py", "cascade/models/unet.py", "cascade/data/activation_model.json",
                   "cascade/data/clip_tokenizer/vocab.json", "cascade/data/clip_tokenizer/merges.txt",
                   "cascade_backends/openvino.py"):
        assert needed in names, needed
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    pins = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.split("#")[0].strip()]
    assert [r for r in requires if "extra ==" not in r] == pins  # the pins install.py installs, torch not among them
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "stable-cascade = cascade.cli:main" in entry_points


def test_python_m_cascade_and_the_script_work_from_any_folder(target, tmp_path):
    env = _only(target)
    where = _run([sys.executable, "-c", "import cascade, cascade_backends; print(cascade.__file__); "
                                        "print(cascade_backends.__file__)"], cwd=tmp_path, env=env)
    assert where.returncode == 0 and all(Path(p).is_relative_to(target) for p in where.stdout.split()), where
    helped = _run([sys.executable, "-m", "cascade", "--help"], cwd=tmp_path, env=env)
    assert helped.returncode == 0 and "generate" in helped.stdout, helped.stderr[-2000:]
    script = target / "bin" / ("stable-cascade.exe" if os.name == "nt" else "stable-cascade")
    scripted = _run([str(script), "--help"], cwd=tmp_path, env=env)
    assert scripted.returncode == 0 and scripted.stdout == helped.stdout, scripted.stderr[-2000:]
    doctor = _run([sys.executable, "-m", "cascade", "backends", "--json", "--device", "cpu"], cwd=tmp_path, env=env)
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    assert json.loads(doctor.stdout)["selected"]["dtypes"]["vqgan"] == "float32"


def test_installing_keeps_the_torch_already_there(wheel):
    """With every pin already present (this environment), pip would install only our distribution: nothing in
    the metadata makes it replace torch (a vendor build, e.g. +rocm or +xpu, must survive `pip install .`)."""
    out = _pip("install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet", "--report", "-", str(wheel),
               cwd=wheel.parent)
    planned = [item["metadata"]["name"] for item in json.loads(out.stdout)["install"]]
    assert planned == ["stable-cascade-engine"]


# --- inside SD.Next, next to another extension ----------------------------------------------------------------------
FAKE_SDNEXT = {
    "modules/__init__.py": "",
    "modules/shared.py": (
        "import os\nfrom types import SimpleNamespace\n"
        "opts = SimpleNamespace(data={}, diffusers_dir=os.environ['FAKE_DIFFUSERS'], diffusers_offload_mode='none')\n"
        "sd_model, sd_loaded = None, False\n"
        "def refresh_checkpoints():\n    pass\n"),
    "modules/paths.py": "import os\nmodels_path = os.environ['FAKE_MODELS']\n",
    "modules/logger.py": "import logging\nlog = logging.getLogger('sdnext')\n",
    "modules/script_callbacks.py": (
        "callbacks = []\n"
        "def on_ui_settings(fn):\n    callbacks.append(fn)\n"
        "def on_app_started(fn):\n    callbacks.append(fn)\n"
        "def on_script_unloaded(fn):\n    callbacks.append(fn)\n"),
    "modules/scripts.py": "class Script:\n    pass\nAlwaysVisible = object()\n",
    "modules/devices.py": "import torch\ndevice = torch.device('cpu')\nbackend = 'cpu'\ndtype = torch.float32\n",
    "pipelines/__init__.py": "",
    "pipelines/model_stablecascade.py": (
        "def load_cascade_combined(checkpoint_info, diffusers_load_config=None):\n"
        "    return 'original loader'\n"),
    # Another extension with the generic names: it imports them at script import and lazily at run time.
    "extensions/other-extension/backends/__init__.py": "WHO = 'other-extension'\n",
    "extensions/other-extension/backends/thing.py": "WHO = 'other-extension'\n",
    "extensions/other-extension/extension/__init__.py": "WHO = 'other-extension'\n",
    "extensions/other-extension/scripts/other.py": (
        "import backends, extension\n"
        "assert backends.WHO == extension.WHO == 'other-extension', (backends.__file__, extension.__file__)\n"
        "def at_run_time():\n"
        "    import backends.thing\n"
        "    return backends.thing.WHO\n"),
}

# SD.Next's loading, as modules/scripts_manager.py load_scripts and modules/script_loading.py load_module do it.
HARNESS = r'''
import importlib.util, json, os, sys, traceback
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # SD.Next runs from its root

def load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

loaded, errors = {}, {}
for root in sys.argv[1:]:
    for name in sorted(os.listdir(os.path.join(root, "scripts"))):
        if not name.endswith(".py"):
            continue
        path = os.path.join(root, "scripts", name)
        syspath = sys.path
        try:
            sys.path = [root] + sys.path
            loaded[os.path.basename(root)] = load_module(path)
        except Exception:
            errors[os.path.basename(root)] = traceback.format_exc()
        finally:
            sys.path = syspath

out = {"errors": errors, "modules": {}}
for name in ("backends", "extension", "cascade", "cascade_backends", "cascade_sdnext"):
    out["modules"][name] = getattr(sys.modules.get(name), "__file__", None)
# Run time: no extension root on sys.path any more; lazy imports go through sys.modules and package paths.
out["other_at_run_time"] = loaded["other-extension"].at_run_time() if "other-extension" in loaded else None
ours = [k for k, module in loaded.items() if hasattr(module, "StableCascadePromptText")]
if ours:
    import pipelines.model_stablecascade as sc
    from modules import devices, scripts
    out["script_class"] = issubclass(loaded[ours[0]].StableCascadePromptText, scripts.Script)
    out["wrapped_loader"] = sc.load_cascade_combined(SimpleNamespace(path="/nowhere/sdxl.safetensors", name="x"))
    from cascade_sdnext.host import sdnext_backend
    backend = sdnext_backend(devices)
    out["backend"] = [backend.name, sys.modules[type(backend).__module__].__file__]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def fake_sdnext(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sdnext")
    for rel, text in FAKE_SDNEXT.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "harness.py").write_text(HARNESS)
    return root


def _load_in_sdnext(sdnext: Path, order: list[Path]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FAKE_MODELS=str(sdnext / "models"), FAKE_DIFFUSERS=str(sdnext / "models" / "Diffusers"))
    return subprocess.Popen([sys.executable, str(sdnext / "harness.py"), *map(str, order)], cwd=sdnext, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_generic_names_of_another_extension_and_ours_do_not_collide(fake_sdnext):
    other = fake_sdnext / "extensions" / "other-extension"
    runs = {"other first": _load_in_sdnext(fake_sdnext, [other, ROOT]),
            "ours first": _load_in_sdnext(fake_sdnext, [ROOT, other])}
    for order, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, (order, stderr[-3000:])
        out = json.loads(stdout.splitlines()[-1])
        assert out["errors"] == {}, (order, out["errors"])
        mods = out["modules"]
        assert Path(mods["backends"]).is_relative_to(other) and Path(mods["extension"]).is_relative_to(other), order
        for ours in ("cascade", "cascade_backends", "cascade_sdnext"):
            assert Path(mods[ours]).is_relative_to(ROOT), (order, ours, mods[ours])
        assert out["other_at_run_time"] == "other-extension", order
        assert out["script_class"] and out["wrapped_loader"] == "original loader", order
        assert out["backend"][0] == "cpu" and Path(out["backend"][1]).is_relative_to(ROOT / "cascade_backends"), order


def test_a_foreign_cascade_package_fails_loudly(fake_sdnext, tmp_path):
    """`cascade` is the one name we cannot give up (`python -m cascade`): taken by someone else, our script stops
    with a message naming the other package, and the other extension keeps working."""
    squatter = tmp_path / "squatter"
    (squatter / "cascade").mkdir(parents=True)
    (squatter / "cascade" / "__init__.py").write_text("")
    (squatter / "scripts").mkdir()
    (squatter / "scripts" / "squat.py").write_text("import cascade\ndef at_run_time():\n    return 'squatter'\n")
    proc = _load_in_sdnext(fake_sdnext, [squatter, ROOT])
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.splitlines()[-1])
    (error,) = out["errors"].values()
    assert "module name 'cascade' is already taken by" in error and str(squatter) in error
    assert out["modules"]["cascade_sdnext"] is None  # stopped before loading anything of ours but the device layer
