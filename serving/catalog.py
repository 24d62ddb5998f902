"""The models a server can use, by name: the one it was started with, plus the pairs of the configured folder.

A request names a model (`sd_model_checkpoint`, SD.Next's field) by one of the names `GET /sdapi/v1/sd-models`
lists; nothing else is looked up, and a path in a request is never opened — only files the operator configured are.
The folder is paired by the extension's rules (tensor headers, sidecars, `<name>_main`/`<name>_decoder`), so a
folder that works in SD.Next works here under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.errors import CascadeError, InvalidRequestError
from cascade.session import PipelineSpec, resolve_paths

from .config import ServeConfig


@dataclass(frozen=True)
class ModelEntry:
    name: str
    prior: Path
    decoder: Path
    source: str  # "tiny" | "files" (--prior/--decoder) | "folder" (--models-dir)

    def spec(self, config: ServeConfig) -> PipelineSpec:
        extra = {} if self.source == "folder" else {"text_encoder": config.text_encoder, "stage_a": config.stage_a}
        prior, decoder = (None, None) if self.source == "tiny" else (self.prior, self.decoder)
        return PipelineSpec(prior=prior, decoder=decoder, device=config.device, dtype=config.dtype,
                            offload=config.offload, vram=config.vram, **extra)

    def as_sdnext(self, root: Path | None) -> dict[str, Any]:
        """SD.Next's ItemModel (modules/api/models.py): title, model_name, filename, type, sha256, hash, config.
        `filename` is the Stage C file's name relative to the folder, not a server path."""
        filename = self.prior.name
        if root is not None and self.source == "folder":
            try:
                filename = self.prior.relative_to(root).as_posix()
            except ValueError:
                pass
        return {"title": self.name, "model_name": self.name, "filename": filename, "type": "sc", "sha256": None,
                "hash": None, "config": None}


def _folder_pairs(root: str) -> tuple[Path, list[ModelEntry], list[str]]:
    # The pairing rules live in the extension's library module, which imports only cascade (no SD.Next).
    # TODO(lead): move extension/library.py to cascade/library.py; then import it from there.
    try:
        from extension.library import scan_library
    except ImportError:
        raise CascadeError("--models-dir needs the repository checkout (its extension/library.py pairs the files); "
                           "run from the repo, or serve one model with --prior/--decoder") from None

    lib = scan_library(root)
    return lib.root, [ModelEntry(p.name, p.prior, p.decoder, "folder") for p in lib.pairs], list(lib.problems)


class Catalog:
    """The default model first, then the folder's pairs (rescanned on each listing: headers are cached)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        spec = PipelineSpec(prior=config.prior, decoder=config.decoder)
        prior, decoder = resolve_paths(spec)
        self.default = ModelEntry(Path(prior).stem, Path(prior), Path(decoder), "tiny" if spec.is_tiny else "files")
        self.root: Path | None = None
        self.problems: list[str] = []
        if config.models_dir and not Path(config.models_dir).expanduser().is_dir():
            raise CascadeError(f"--models-dir {config.models_dir}: no such folder (it holds the Stage C 'main' and "
                               "Stage B 'decoder' files of the models a request may pick by name)")

    def entries(self) -> list[ModelEntry]:
        out = [self.default]
        if self.config.models_dir:
            self.root, pairs, self.problems = _folder_pairs(self.config.models_dir)
            out += [p for p in pairs if p.name != self.default.name]
        return out

    def controlnets(self, items, key: str, max_pixels: int, max_bytes: int) -> tuple:
        """A request's ControlNet items -> engine entries, the files found by name in `<--models-dir>/ControlNet`
        only (extension/controlnet.py, the same rule and JSON as SD.Next's `extra.cascade_controlnets`)."""
        if not items:
            return ()
        if not self.config.models_dir:
            raise InvalidRequestError(f"{key}: this server has no ControlNet folder; start it with --models-dir DIR "
                                      "and put the Stage C ControlNet files in DIR/ControlNet")
        try:
            from extension.controlnet import FOLDER, entries_from_json
        except ImportError:
            raise CascadeError("ControlNets need the repository checkout (extension/controlnet.py maps them)") from None
        folder = Path(self.config.models_dir).expanduser() / FOLDER
        return entries_from_json(list(items), folder, f"--models-dir's {FOLDER} folder", key, max_pixels, max_bytes)

    def find(self, name: str | None) -> ModelEntry:
        """The entry named `name` (None: the default). Anything that is not a listed name is refused (400)."""
        if name is None or name == "" or name == self.default.name:
            return self.default
        entries = self.entries()
        for entry in entries:
            if name == entry.name:
                return entry
        names = ", ".join(e.name for e in entries)
        if any(c in name for c in "/\\") or name.startswith(".") or ":" in name:
            raise InvalidRequestError(f"sd_model_checkpoint {name!r} looks like a path; models are chosen by name "
                                      f"only (GET /sdapi/v1/sd-models): {names}")
        raise InvalidRequestError(f"no model named {name!r}; this server has: {names}")
