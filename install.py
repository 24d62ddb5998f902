"""Set-up step, in two contexts (one file, as SD.Next requires).

Standalone:   python install.py [--dev] [--serve]
    Installs torch (only when no torch is importable: a vendor build you installed yourself is kept) and the
    exact pins of requirements.txt into the running Python, with every transitive package held to the versions in
    constraints.txt; --dev adds the test tools of requirements-dev.txt and the serving packages (the server's tests
    are part of the suite); --serve adds only the serving packages of requirements-serve.txt (FastAPI, uvicorn,
    Prometheus client, Ray Serve) for `python -m cascade serve|batch`.
Inside SD.Next (it runs `python install.py` with cwd = this folder and PYTHONPATH = the SD.Next root):
    installs only packages that are missing, with `launch.run_pip` and exact pins, and does nothing when
    everything is present — SD.Next's own torch/diffusers/transformers are never replaced.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH_PIN = "torch==2.13.0"
MIN_PYTHON = (3, 11)  # Requires-Python of the pins in requirements*.txt (numpy 2.4, diffusers 0.42, ...)
# Installed without dependencies: its package pulls torchvision and training tools the tests do not need.
DEV_NO_DEPS = ["k-diffusion==0.1.1.post1"]


def read_pins(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def distribution_name(pin: str) -> str:
    return pin.split("==")[0].split("[")[0].strip()


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def inside_sdnext() -> bool:
    """SD.Next puts its root on PYTHONPATH when it runs an extension's install.py."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and (Path(entry) / "launch.py").is_file() and (Path(entry) / "installer.py").is_file():
            return True
    return False


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def install_standalone(dev: bool, serve: bool = False) -> None:
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed (this is {sys.version.split()[0]}): "
                 "the pinned diffusers, transformers, numpy, scipy and pillow releases need it.")
    if importlib.util.find_spec("torch") is None:
        # A GPU user installs torch for their vendor first (see README); we only fill the gap.
        pip(TORCH_PIN)
    constraints = ("-c", str(ROOT / "constraints.txt"))  # transitive pins: a fresh clone resolves what was tested
    pip("-r", str(ROOT / "requirements.txt"), *constraints)
    if dev:
        pip("-r", str(ROOT / "requirements-dev.txt"), *constraints)
        pip("--no-deps", *DEV_NO_DEPS)
    if serve:  # the optional HTTP server / Ray Serve / batch packages (serving/); never needed by the engine
        pip("-r", str(ROOT / "requirements-serve.txt"), *constraints)


def install_in_sdnext() -> None:
    import launch  # SD.Next's installer helpers

    for pin in read_pins("requirements.txt"):
        dist = distribution_name(pin)
        if installed_version(dist) is None:
            launch.run_pip(f"install {pin}", f"Stable Cascade extension requirement: {pin}")


def main(argv: list[str]) -> int:
    if inside_sdnext():
        install_in_sdnext()
    else:
        install_standalone(dev="--dev" in argv, serve="--serve" in argv or "--dev" in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
