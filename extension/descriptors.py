"""Descriptor folders: how a Stage C + Stage B pair becomes a model in SD.Next's dropdown without any SD.Next patch.

SD.Next lists every folder of `models/Diffusers` holding a `model_index.json` as `Diffusers/<folder>` and routes
`_class_name: StableCascadeCombinedPipeline` to its Stable Cascade loader, which this extension wraps. So for each
pair we write `<diffusers_dir>/<name>/model_index.json` plus our marker `sd_cascade.json` (which files, which
rule). Writes are atomic (temp file + rename) and idempotent (unchanged content is not rewritten); folders whose
pair is gone are removed, but only folders carrying our marker, and only the files we wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .library import Pair

MARKER = "sd_cascade.json"
OWNER = "sd-cascade-extension"
FORMAT = 1
MODEL_INDEX = "model_index.json"
_INDEX = {
    "_class_name": "StableCascadeCombinedPipeline",
    "_diffusers_version": "0.39.0",
    "_sd_cascade": f"descriptor written by the Stable Cascade extension; see {MARKER}",
}


@dataclass
class Descriptor:
    """What our marker file says: the pair behind a `Diffusers/<name>` model."""

    folder: Path
    prior: Path
    decoder: Path
    rule: str
    library: Path


@dataclass
class SyncReport:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)


def _atomic_write(path: Path, text: str) -> bool:
    """Write `text` unless the file already holds it; returns whether anything was written."""
    if path.is_file():
        try:
            if path.read_text() == text:
                return False
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def _marker_text(pair: Pair, library: Path) -> str:
    data = {"owner": OWNER, "format": FORMAT, "prior": str(pair.prior), "decoder": str(pair.decoder),
            "rule": pair.rule, "library": str(library)}
    return json.dumps(data, indent=2) + "\n"


def read_descriptor(folder: str | os.PathLike) -> Descriptor | None:
    """Our marker in `folder`, or None when the folder is not one of ours (or the marker is unreadable)."""
    folder = Path(folder)
    try:
        data: dict[str, Any] = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("owner") != OWNER:
        return None
    try:
        return Descriptor(folder, Path(data["prior"]), Path(data["decoder"]), str(data.get("rule", "")),
                          Path(data.get("library", "")))
    except (KeyError, TypeError):
        return None


def is_ours(folder: str | os.PathLike) -> bool:
    return read_descriptor(folder) is not None


def sync(pairs: list[Pair], library: Path, diffusers_dir: str | os.PathLike) -> SyncReport:
    """Make `diffusers_dir` hold exactly one descriptor per pair (for our folders; others are never touched)."""
    report = SyncReport()
    root = Path(diffusers_dir)
    root.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for pair in pairs:
        folder = root / pair.name
        if folder.exists() and not is_ours(folder):
            report.problems.append(f"{folder} exists and was not made by this extension; the model {pair.name!r} is "
                                   "not listed. Rename the Stage C file or that folder.")
            continue
        wanted[pair.name] = pair
        folder.mkdir(exist_ok=True)
        wrote = _atomic_write(folder / MARKER, _marker_text(pair, library))
        wrote |= _atomic_write(folder / MODEL_INDEX, json.dumps(_INDEX, indent=2) + "\n")
        (report.written if wrote else report.unchanged).append(pair.name)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name in wanted or not is_ours(folder):
            continue
        for name in (MODEL_INDEX, MARKER):
            (folder / name).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            report.problems.append(f"{folder}: stale descriptor removed, but the folder holds other files; left it.")
        report.removed.append(folder.name)
    return report
