"""Legacy intel-extension-for-pytorch handling.  IPEX is retired (last release 2.8, archived 2026-03): native
torch.xpu is the target.  IPEX is imported only when installed *and* built for the running torch's major.minor
(a mismatched IPEX fails at import or corrupts op registration); it is never required."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass


@dataclass(frozen=True)
class IpexStatus:
    installed: bool
    version: str | None
    compatible: bool
    imported: bool
    reason: str


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split("+", 1)[0].split(".")
    out = []
    for p in parts[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def status(torch_version: str, ipex_version: str | None = None, *, probe: bool = True) -> IpexStatus:
    """Decide without importing.  `ipex_version` may be given (tests); otherwise read from package metadata."""
    if ipex_version is None and probe:
        try:
            ipex_version = importlib.metadata.version("intel-extension-for-pytorch")
        except importlib.metadata.PackageNotFoundError:
            ipex_version = None
    if ipex_version is None:
        return IpexStatus(False, None, False, False, "not installed (not needed: native torch.xpu is used)")
    if _major_minor(ipex_version) != _major_minor(torch_version):
        return IpexStatus(True, ipex_version, False, False,
                          f"installed {ipex_version} does not match torch {torch_version}: not imported "
                          "(uninstall it; IPEX is retired and native torch.xpu needs nothing from it)")
    return IpexStatus(True, ipex_version, True, False, f"{ipex_version} matches torch {torch_version}")


def maybe_import(torch_version: str) -> IpexStatus:
    """Import IPEX only when installed and matching; import errors are reported, not raised (IPEX is optional)."""
    st = status(torch_version)
    if not st.compatible:
        return st
    try:
        importlib.import_module("intel_extension_for_pytorch")
    except Exception as exc:  # noqa: BLE001 - optional legacy package; report why it was not used
        return IpexStatus(True, st.version, True, False, f"import failed: {exc}")
    return IpexStatus(True, st.version, True, True, f"{st.version} imported (matches torch {torch_version})")
