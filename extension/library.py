"""The extension's model folder: what each file is (by its tensor headers) and which Stage C goes with which Stage B.

A pair is one SD.Next model, named after its Stage C file. The Stage B for a Stage C is chosen by the first rule
that gives an answer:
1. sidecar  `<stage C stem>.cascade.json` containing `{"decoder": "<file name of the Stage B>"}`;
2. name     `<base>_main` / `<base>_prior` / `<base>_stage_c` / `<base>_c` goes with `<base>_decoder` /
            `<base>_stage_b` / `<base>_b` (separators `_`, `-`, `.` or space, any case);
3. setting  the "default decoder" setting names a Stage B file of the folder;
4. only     the folder holds exactly one Stage B.
A Stage C that no rule pairs, a lone Stage B and files that are not Stable Cascade are reported as problems and
never become models. Classification reads headers only (never names or sizes), cached by size and mtime.
Nothing outside the folder is read: sidecars naming files elsewhere are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.checkpoints import Checkpoint, describe, printable, scan
from cascade.errors import CascadeError, CorruptFileError, PickleRefusedError
from cascade.tensorfile import PICKLE_SUFFIXES

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".cascade.json"
MAX_DEPTH = 3  # subfolders scanned below the model folder
AUTOMATIC = "Automatic"

_TAG = r"(?:[-_. ])"
_C_NAME = re.compile(rf"^(?P<base>.+?){_TAG}(?:main|prior|stage{_TAG}?c|c)$", re.IGNORECASE)
_B_NAME = re.compile(rf"^(?P<base>.+?){_TAG}(?:decoder|stage{_TAG}?b|b)$", re.IGNORECASE)


@dataclass
class FileEntry:
    """One file of the folder: its role (stage_c, stage_b, ...) or why it cannot be used."""

    path: Path
    role: str | None = None
    title: str | None = None
    checkpoint: Checkpoint | None = None
    error: str | None = None

    def as_json(self, root: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"file": printable(_rel(self.path, root), 400), "role": self.role, "title": self.title}
        if self.checkpoint is not None:
            info = describe(self.checkpoint)
            out["parts"] = info["parts"]
            out["unknown_tensors"] = len(info["unknown_tensors"])
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Pair:
    """A Stage C + Stage B pair: one model in SD.Next's dropdown."""

    name: str
    prior: Path
    decoder: Path
    rule: str  # sidecar | name | setting | only

    def as_json(self, root: Path) -> dict[str, Any]:
        return {"name": self.name, "prior": _rel(self.prior, root), "decoder": _rel(self.decoder, root), "rule": self.rule}


@dataclass
class Library:
    """What a scan of the folder found."""

    root: Path
    files: list[FileEntry] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def by_role(self, role: str) -> list[FileEntry]:
        return [f for f in self.files if f.role == role]

    def find(self, path: str | os.PathLike) -> FileEntry | None:
        target = _lexical(Path(path))
        return next((f for f in self.files if _lexical(f.path) == target), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.root),
            "pairs": [p.as_json(self.root) for p in self.pairs],
            "files": [f.as_json(self.root) for f in self.files],
            "problems": list(self.problems),
        }


def _lexical(path: Path) -> Path:
    """Absolute and normalised without following symlinks: a file linked into the folder belongs to the folder."""
    return Path(os.path.normpath(path.absolute()))


def _shown(path: Path, root: Path) -> str:
    """A file's folder-relative name as problem messages show it (escape sequences in names made harmless)."""
    return printable(_rel(path, root), 400)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --- scanning ---------------------------------------------------------------------------------------------------

_CACHE: dict[tuple[str, int, int], tuple[Checkpoint | None, str | None]] = {}
_MAX_SIDECAR = 64 * 1024  # a sidecar holds one file name


def _candidate_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < MAX_DEPTH)
        for name in sorted(filenames):
            if name.lower().endswith(".safetensors") or name.lower().endswith(PICKLE_SUFFIXES):
                out.append(Path(dirpath) / name)
    return out


def _linked(path: Path) -> bool:
    """Is the file reached through a symbolic link (the file itself or a linked folder on the way)?"""
    try:
        parent = path.parent.absolute()
        return path.is_symlink() or os.path.realpath(parent) != os.path.normpath(parent)
    except OSError:
        return True


def _os_reason(path: Path, err: OSError) -> str:
    """An OS error in words, without paths (a link's target is nobody's business in a model listing)."""
    if isinstance(err, FileNotFoundError) and path.is_symlink():
        return "A broken link: the file it points to does not exist."
    return f"Cannot be read ({(err.strerror or type(err).__name__).lower()}). Check the file's permissions."


def _reason(path: Path, err: CascadeError) -> str:
    """The error's message as a problem of this file: without the file's own name (the problem list names it
    once), and for a link to something that is not a safetensors file only that: no size, no first bytes."""
    if _linked(path) and path.suffix.lower() == ".safetensors" and isinstance(err, (CorruptFileError, PickleRefusedError)):
        return "Not a safetensors file."
    message = str(err)
    names = {path.name, printable(path.name)}
    try:
        names |= {path.resolve().name, printable(path.resolve().name)}
    except OSError:
        pass
    for name in sorted(names, key=len, reverse=True):
        if message.startswith(name + ": "):
            message = message[len(name) + 2 :]
        elif message.startswith(name + " "):
            message = "This file " + message[len(name) + 1 :]
        message = message.replace(name, "this file")
    return message[:1].upper() + message[1:]


def _classify_uncached(path: Path) -> tuple[Checkpoint | None, str | None]:
    try:
        return scan(path), None
    except CascadeError as e:
        return None, _reason(path, e)
    except OSError as e:
        return None, _os_reason(path, e)
    except Exception as e:  # a bug in classification must cost one file, never the folder listing or SD.Next
        log.exception("Stable Cascade: classifying %s failed", printable(str(path), 400))
        return None, f"Could not be classified (internal error {type(e).__name__}); please report it."


def classify(path: Path) -> FileEntry:
    """Scan one file's header (cached by path, size and mtime); any failure becomes the entry's `error`, a reason
    that does not repeat the file's name."""
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError as e:
        return FileEntry(path, error=_os_reason(path, e))
    if key not in _CACHE:
        _CACHE[key] = _classify_uncached(path)
    ckpt, error = _CACHE[key]
    if ckpt is None:
        return FileEntry(path, error=error)
    return FileEntry(path, ckpt.role, ckpt.title, ckpt)


def scan_library(root: str | os.PathLike, default_decoder: str | None = None) -> Library:
    """Classify every checkpoint under `root` and pair them. A missing folder is an empty library (a problem)."""
    root = Path(root).expanduser().resolve()
    lib = Library(root)
    if not root.is_dir():
        lib.problems.append(f"The Stable Cascade model folder {root} does not exist: create it and put the Stage C "
                            "('main') and Stage B ('decoder') files there, or change it in Settings > Stable Cascade.")
        return lib
    lib.files = [classify(p) for p in _candidate_files(root)]
    lib.pairs, lib.problems = pair_files(lib, default_decoder)
    return lib


# --- pairing ----------------------------------------------------------------------------------------------------

def _base(stem: str, pattern: re.Pattern) -> str | None:
    m = pattern.match(stem)
    return m.group("base").casefold() if m else None


def _inside(root: Path, path: Path) -> bool:
    try:
        _lexical(path).relative_to(root)
        return True
    except ValueError:
        return False


def _sidecar_decoder(lib: Library, prior: Path) -> tuple[Path | None, str | None]:
    sidecar = prior.with_name(prior.stem + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None, None
    label = printable(sidecar.name)
    try:
        with open(sidecar, "rb") as f:
            raw = f.read(_MAX_SIDECAR + 1)
        if len(raw) > _MAX_SIDECAR:
            raise ValueError(f"over {_MAX_SIDECAR} bytes")
        name = json.loads(raw)["decoder"]
        if not isinstance(name, str) or not name or "\x00" in name:
            raise TypeError("the decoder must be a file name")
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
        reason = "JSON nested too deeply" if isinstance(e, RecursionError) else printable(str(e), 120)
        return None, f"{label}: not a valid sidecar ({reason}); expected {{\"decoder\": \"<Stage B file name>\"}}"
    shown = "'" + printable(name, 120) + "'"
    candidate = _lexical(prior.parent / name)
    if not _inside(lib.root, candidate):
        return None, f"{label}: {shown} is outside the model folder {lib.root}; only files inside it are used"
    entry = lib.find(candidate)
    if entry is None:
        return None, f"{label}: the decoder {shown} was not found in {printable(str(prior.parent), 300)}"
    if entry.role != "stage_b":
        what = entry.title or entry.error or "not a Stable Cascade file"
        return None, f"{label}: {shown} is not a Stage B (decoder) file: {what}"
    return entry.path, None


def _descriptor_name(stem: str) -> str:
    """The model's name: the Stage C file's stem, adjusted where SD.Next's folder listing would mangle it."""
    name = stem
    while "--" in name:  # SD.Next reads `--` as a repo separator ("org--name" -> "org/name")
        name = name.replace("--", "-")
    if name.startswith("models-"):
        name = "sc-" + name
    if name.endswith("-prior"):  # SD.Next skips folders ending in -prior
        name = name[: -len("-prior")] + "_prior"
    return name


def pair_files(lib: Library, default_decoder: str | None = None) -> tuple[list[Pair], list[str]]:
    """Apply the pairing rules of the module docstring; returns (pairs, problems)."""
    problems: list[str] = []
    priors, decoders = lib.by_role("stage_c"), lib.by_role("stage_b")
    by_base: dict[str, list[Path]] = {}
    for d in decoders:
        base = _base(d.path.stem, _B_NAME)
        if base:
            by_base.setdefault(base, []).append(d.path)
    default_path = None
    if default_decoder and default_decoder != AUTOMATIC:
        entry = lib.find(lib.root / default_decoder)
        if entry is not None and entry.role == "stage_b":
            default_path = entry.path
        else:
            problems.append(f"The default decoder setting names {default_decoder!r}, which is not a Stage B file "
                            f"in {lib.root}.")

    pairs: list[Pair] = []
    names: set[str] = set()
    used_decoders: set[Path] = set()
    for c in priors:
        decoder, rule = None, None
        found, problem = _sidecar_decoder(lib, c.path)
        if problem:
            problems.append(problem)
        if found is not None:
            decoder, rule = found, "sidecar"
        if decoder is None:
            base = _base(c.path.stem, _C_NAME)
            matches = by_base.get(base, []) if base else []
            if len(matches) == 1:
                decoder, rule = matches[0], "name"
        if decoder is None and default_path is not None:
            decoder, rule = default_path, "setting"
        if decoder is None and len(decoders) == 1:
            decoder, rule = decoders[0].path, "only"
        if decoder is None:
            problems.append(
                f"{_shown(c.path, lib.root)}: no Stage B pairs with this Stage C ({len(decoders)} Stage B files in the "
                f"folder). Name them <name>_main / <name>_decoder, add {c.path.stem}{SIDECAR_SUFFIX} with "
                "{\"decoder\": \"<file>\"}, or choose a default decoder in Settings > Stable Cascade."
            )
            continue
        name = _descriptor_name(c.path.stem)
        if name.casefold() in names:
            problems.append(f"{_shown(c.path, lib.root)}: another Stage C already gives a model named {name!r}; "
                            "rename one of the files.")
            continue
        names.add(name.casefold())
        used_decoders.add(decoder)
        pairs.append(Pair(name, c.path, decoder, rule))

    for d in decoders:
        if d.path not in used_decoders:
            problems.append(f"{_shown(d.path, lib.root)}: a Stage B (decoder) file with no Stage C; it is not a model on "
                            "its own. Add the matching Stage C ('main') file to the folder.")
    for f in lib.files:
        if f.error:
            problems.append(f"{_shown(f.path, lib.root)}: {f.error}")
    return pairs, problems


def decoder_choices(lib: Library) -> list[str]:
    """Values for the default-decoder setting: Automatic plus every Stage B, relative to the folder."""
    return [AUTOMATIC] + [_rel(d.path, lib.root) for d in lib.by_role("stage_b")]
