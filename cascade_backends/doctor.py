"""`python -m cascade_backends [--json]`: what this machine offers, what would be chosen and why, and actionable
warnings (ReBAR off on Arc, ROCm gfx target without kernels, several Intel GPUs, a mismatched IPEX...).

The device layer knows no model, so what a model would run in on each device comes from the caller as an
`Advisor` (the engine's `python -m cascade backends` passes its per-stage dtypes and warnings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from . import detect, env as env_mod, ipex, openvino as ov_mod
from .base import Backend
from .types import BackendUnavailable, GiB

# Discrete Intel Arc PCI device ids (Alchemist DG2, Battlemage BMG): these need Resizable BAR.
_ARC_DGPU_IDS = (range(0x5690, 0x56D0), range(0xE200, 0xE300))
_PCI_DISPLAY_CLASS = "0x03"
_REBAR_MIN_BAR = 1 * GiB  # without ReBAR the VRAM aperture is 256 MiB


@dataclass(frozen=True)
class Advice:
    """What the caller's model would do on one device: a dtype per model part ("float32", ...), OpenVINO precision
    hints per part (OpenVINO only), and warnings worth showing for that device."""

    dtypes: Mapping[str, str] = field(default_factory=dict)
    openvino_precision: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


Advisor = Callable[[Backend], Advice]


def _name(dtype: Any) -> str:
    return "none" if dtype is None else str(dtype).replace("torch.", "")


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


def rebar_status(sysfs: Path = Path("/sys/bus/pci/devices")) -> list[dict[str, Any]]:
    """Linux only: for every discrete Arc card, the largest memory BAR and whether Resizable BAR looks enabled."""
    out: list[dict[str, Any]] = []
    if not sysfs.is_dir():
        return out
    for dev in sorted(sysfs.iterdir()):
        try:
            if (dev / "vendor").read_text().strip().lower() != "0x8086":
                continue
            if not (dev / "class").read_text().strip().lower().startswith(_PCI_DISPLAY_CLASS):
                continue
            did = int((dev / "device").read_text().strip(), 16)
            if not any(did in r for r in _ARC_DGPU_IDS):
                continue
            largest = 0
            for line in (dev / "resource").read_text().splitlines()[:6]:
                start, end, _flags = (int(v, 16) for v in line.split()[:3])
                if end > start:
                    largest = max(largest, end - start + 1)
        except (OSError, ValueError):
            continue
        out.append({"pci": dev.name, "device_id": f"0x{did:04x}", "largest_bar": largest,
                    "rebar": largest >= _REBAR_MIN_BAR})
    return out


def _versions(tm: Any) -> dict[str, Any]:
    st = ipex.status(str(tm.__version__))
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": str(tm.__version__),
        "torch_cuda": getattr(tm.version, "cuda", None),
        "torch_hip": getattr(tm.version, "hip", None),
        "torch_xpu": getattr(tm.version, "xpu", None),
        "openvino": ov_mod.version(),
        "ipex": st.version,
        "ipex_status": st.reason,
    }


def _device_row(b: Backend, *, with_memory: bool) -> dict[str, Any]:
    row = dict(b.summary())
    row["attention"] = b.attention.kernel
    row["max_attention_bytes"] = b.max_attention_bytes
    row["notes"] = list(b.capabilities.notes)
    row["warnings"] = list(b.warnings)
    if with_memory:
        try:
            m = b.memory()
            row["memory_free"], row["memory_total"] = m.free, m.total
        except Exception as exc:  # noqa: BLE001 - a failing driver query is reported, not fatal
            row["memory_error"] = str(exc)
    return row


def _warnings(tm: Any, backends: Sequence[Backend], env: Mapping[str, str], sysfs: Path,
              advisor: Advisor | None) -> list[str]:
    w: list[str] = []
    for b in backends:
        w.extend(f"{b.device if b.name != 'openvino' else 'openvino:' + str(b.ov_device)}: {x}" for x in b.warnings)
        if advisor is not None:
            w.extend(f"{b.description}: {x}" for x in advisor(b).warnings)
    xpus = [b for b in backends if b.name == "xpu"]
    arc_present = bool(xpus) or any(b.name == "openvino" and str(b.ov_device).startswith("GPU") for b in backends)
    if arc_present:
        for card in rebar_status(sysfs):
            if not card["rebar"]:
                w.append(f"Intel Arc at {card['pci']}: Resizable BAR appears OFF (largest BAR "
                         f"{card['largest_bar'] // 2**20} MiB). Enable 'Re-Size BAR Support' and 'Above 4G decoding' "
                         "in the BIOS: Arc is several times slower without it")
    if len(xpus) > 1 and not env.get("ONEAPI_DEVICE_SELECTOR"):
        w.append("several Intel GPUs visible (iGPU + Arc?): set ONEAPI_DEVICE_SELECTOR=level_zero:<index> or "
                 "disable the iGPU so allocations and kernels go to the discrete card")
    st = ipex.status(str(tm.__version__))
    if st.installed and not st.compatible:
        w.append(f"intel-extension-for-pytorch {st.reason}")
    return w


def report(selected: Backend | None = None, *, requested: str | None = None, env: Mapping[str, str] = os.environ,
           torch_mod: Any = None, ov_core: Any = None, sysfs: Path = Path("/sys/bus/pci/devices"),
           advisor: Advisor | None = None) -> dict[str, Any]:
    """Everything the doctor knows, as a JSON-friendly dict; with an `advisor`, also what the caller's model would
    run in on the selected device ("dtypes", "openvino_precision") and the advisor's warnings per device."""
    tm = torch_mod if torch_mod is not None else torch
    backends = detect.available_backends(env=env, torch_mod=tm, ov_core=ov_core)
    unavailable = {}
    for name in ("xpu", "rocm", "cuda", "mps", "openvino"):
        why = detect.why_unavailable(name, tm, ov_core=ov_core)
        if why is not None:
            unavailable[name] = why
    chosen: dict[str, Any]
    if selected is None:
        try:
            selected = detect.select_backend(requested, env=env, torch_mod=tm, ov_core=ov_core)
        except BackendUnavailable as exc:
            selected = None
            chosen = {"error": str(exc)}
    if selected is not None:
        chosen = {
            "backend": selected.name,
            "device": str(selected.device),
            "ov_device": selected.ov_device,
            "description": selected.description,
            "reasons": list(selected.reasons),
            "preferred_low_precision": _name(selected.preferred_low_precision()),
            "attention": {"kernel": selected.attention.kernel, "max_bytes": selected.attention.max_bytes,
                          "reason": selected.attention.reason},
            "environment": [{"name": c.name, "value": c.value, "would_set": c.applied, "current": c.previous,
                             "read_at": c.when, "reason": c.reason}
                            for c in env_mod.plan(selected.name, dict(env))],
        }
        if advisor is not None:
            advice = advisor(selected)
            chosen["dtypes"] = dict(advice.dtypes)
            if selected.name == "openvino":
                chosen["openvino_precision"] = dict(advice.openvino_precision)
    return {
        "versions": _versions(tm),
        "devices": [_device_row(b, with_memory=True) for b in backends],
        "unavailable": unavailable,
        "selected": chosen,
        "warnings": _warnings(tm, backends, env, sysfs, advisor),
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_report(d: Mapping[str, Any]) -> str:
    """Human-readable table of `report()`."""
    v = d["versions"]
    out = ["Versions: " + ", ".join(f"{k}={v[k]}" for k in ("python", "torch", "torch_cuda", "torch_hip",
                                                            "torch_xpu", "openvino", "ipex") if v.get(k)),
           f"IPEX: {v['ipex_status']}", "", "Devices:"]
    rows = [["device", "description", "memory (free/total)", "bf16", "fp16", "fp64", "max alloc", "attention"]]
    for r in d["devices"]:
        dev = r["device"] if r["name"] != "openvino" else f"openvino:{r['ov_device']}"
        mem = f"{_gib(r.get('memory_free'))} / {_gib(r.get('memory_total') or r.get('total_memory'))}"
        yes = lambda f: "yes" if f else "no"  # noqa: E731
        rows.append([dev, r["description"], mem, yes(r["bf16"]), yes(r["fp16"]), yes(r["fp64"]),
                     "none" if r["max_alloc_bytes"] is None else _gib(r["max_alloc_bytes"]), r["attention"]])
    out += ["  " + line for line in _table(rows)]
    if d["unavailable"]:
        out += ["", "Not available:"] + [f"  {k}: {why}" for k, why in d["unavailable"].items()]
    s = d["selected"]
    out.append("")
    if "error" in s:
        out.append(f"Selected: none - {s['error']}")
    else:
        out.append(f"Selected: {s['backend']} ({s['device']}{', ' + s['ov_device'] if s.get('ov_device') else ''})"
                   f" - {s['description']}")
        out += [f"  why: {r}" for r in s["reasons"]]
        out.append(f"  preferred low precision: {s['preferred_low_precision']}")
        if s.get("dtypes"):
            out.append("  dtypes: " + ", ".join(f"{k}={val}" for k, val in s["dtypes"].items()))
        if s.get("openvino_precision"):
            out.append("  OpenVINO precision: " + ", ".join(f"{k}={val}" for k, val in
                                                            s["openvino_precision"].items()))
        out.append(f"  attention: {s['attention']['kernel']} ({s['attention']['reason']})")
        for e in s["environment"]:
            state = (f"would set (read at {e['read_at']}{'; export before launch' if e['read_at'] == 'import' else ''})"
                     if e["would_set"] else f"already set to {e['current']!r}")
            out.append(f"  env {e['name']}={e['value']}: {state} - {e['reason']}")
    out.append("")
    out += ["Warnings:"] + [f"  ! {w}" for w in d["warnings"]] if d["warnings"] else ["Warnings: none"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None, *, advisor: Advisor | None = None,
         prog: str = "python -m cascade_backends") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="what to select (auto, cuda[:N], rocm, xpu, mps, "
                                                  "openvino[:DEV], cpu); default $CASCADE_DEVICE or auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    d = report(requested=a.device, advisor=advisor)
    print(json.dumps(d, indent=2, default=str) if a.json else format_report(d))
    return 0 if "error" not in d["selected"] else 2


if __name__ == "__main__":
    sys.exit(main())
