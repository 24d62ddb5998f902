"""The one way to open a pipeline: files + device + dtype + memory choice -> a loaded, placed `CascadePipeline`.

The CLI, the SD.Next extension and the server all come through `open_pipeline`, so the sequence is written once:

    backend -> sources (headers read once) -> dtypes -> memory plan -> placement -> load -> notes

Hosts that own part of the sequence pass it in: SD.Next gives its own backend (built from its device choice) and,
in its offload modes, its own placement. Nothing here prints; progress goes to the `on_load` callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import CascadeError
from .memory import Plan, budget_for, make_plan, require_fit
from .names import COMPONENTS
from .request import GenerationRequest

PLAN_SIZE = (1024, 1024)  # what a plan is made for when no request is known yet (the model card's size)


@dataclass(frozen=True)
class PipelineSpec:
    """What to open. No prior and no decoder means the embedded tiny model (random weights)."""

    prior: str | Path | None = None
    decoder: str | Path | None = None
    text_encoder: str | Path | None = None
    stage_a: str | Path | None = None
    device: str | None = None  # backend request: auto, cpu, cuda[:N], rocm, xpu, mps, openvino[:DEVICE]
    dtype: str | torch.dtype = "auto"  # UNet dtype: auto (backend policy), bf16, fp16, fp32
    offload: str = "auto"  # memory plan: auto, resident, stage, stream, sequential
    vram: str | None = None  # budget for the plan; None = the device's free memory
    stage_c_encoder: str | Path | None = None  # side files for image inputs / previews (None: the main file's)
    clip_vision: str | Path | None = None
    previewer: str | Path | None = None

    @property
    def is_tiny(self) -> bool:
        return self.prior is None and self.decoder is None

    def side_files(self):
        """The explicit side files (cascade.side_parts.SideFiles); they load on first use, not here."""
        from .side_parts import SideFiles

        return SideFiles(stage_c_encoder=self.stage_c_encoder, previewer=self.previewer, clip_vision=self.clip_vision)


@dataclass(frozen=True)
class LoadEvent:
    """One component starts (`seconds is None`) or finishes loading."""

    component: str
    index: int  # 1-based
    total: int
    nbytes: int  # bytes the component takes at its compute dtype (from the headers)
    dtype: torch.dtype
    seconds: float | None = None


@dataclass
class Session:
    """An open pipeline and everything that was decided to open it."""

    spec: PipelineSpec
    prior_path: Path
    decoder_path: Path
    backend: object
    sources: object  # cascade.loader.Sources
    dtypes: dict[str, torch.dtype]
    plan: Plan | None
    pipeline: object  # cascade.pipeline.CascadePipeline
    notes: list[str] = field(default_factory=list)
    load_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def placement_name(self) -> str:
        return getattr(self.pipeline.placement, "name", "resident")

    def model_names(self, on_progress: Callable[[str], Callable[[int, int], None] | None] | None = None) -> dict[str, str]:
        """Display names and A1111/SD.Next short hashes of the two checkpoints, for the infotext. Hashes are cached by
        path, size and mtime (cascade.infotext.short_hash); `on_progress(file name)` may give a progress callback for
        a file that is actually read (the first time only)."""
        from .infotext import short_hash
        from .paths import hash_cache_file

        names = {"prior_name": self.sources.prior_checkpoint.name, "decoder_name": self.sources.decoder_checkpoint.name}
        for key, path in (("prior_hash", self.prior_path), ("decoder_hash", self.decoder_path)):
            progress = on_progress(Path(path).name) if on_progress is not None else None
            names[key] = short_hash(path, hash_cache_file(), on_progress=progress)
        return names


def select_backend(device: str | None):
    """The backend for a device request; an unavailable or unknown device is a user error (InvalidRequestError)."""
    from cascade_backends import BackendUnavailable, select_backend as select

    from .errors import InvalidRequestError

    try:
        return select(device)
    except (BackendUnavailable, ValueError) as err:
        raise InvalidRequestError(f"device {device!r}: {err}") from None


def resolve_paths(spec: PipelineSpec) -> tuple[Path, Path]:
    """The Stage C and Stage B paths: the given ones, or the embedded tiny model's (built once, cached)."""
    if spec.is_tiny:
        from . import tiny

        return tiny.ensure_tiny_checkpoints()
    if spec.prior is None or spec.decoder is None:
        raise CascadeError("Give both --prior (Stage C 'main' file) and --decoder (Stage B file), or neither for the "
                           "tiny model.")
    return Path(spec.prior), Path(spec.decoder)


def open_sources(spec: PipelineSpec):
    """Scan and pair the files (headers only); a wrong or missing file fails here, before anything loads."""
    from .loader import resolve_sources

    prior, decoder = resolve_paths(spec)
    return prior, decoder, resolve_sources(prior, decoder, text_encoder=spec.text_encoder, stage_a=spec.stage_a)


def plan_memory(sources, backend, dtypes: dict[str, torch.dtype], request: GenerationRequest | None = None,
                offload: str = "auto", vram: str | None = None) -> Plan:
    """The memory plan for `request` (default: the card's size and steps) from the header sizes and the budget."""
    from .sizing import sizes_from_sources

    return plan_for_sizes(sizes_from_sources(sources, dtypes), backend, request, offload, vram)


def plan_for_sizes(sizes, backend, request: GenerationRequest | None = None, offload: str = "auto",
                   vram: str | None = None) -> Plan:
    """The memory plan for component `sizes` (cascade.sizing) on `backend` within `vram` (default: free memory)."""
    from .activations import Shape

    request = request or GenerationRequest(prompt="", width=PLAN_SIZE[0], height=PLAN_SIZE[1])
    shape = Shape(request.width, request.height, request.batch_size, request.compression, request.prior.cfg,
                  request.decoder.cfg)
    steps = {"prior": request.prior.steps, "decoder": request.decoder.steps}
    return make_plan(sizes, shape, budget_for(backend, vram), steps=steps, mode=offload)


def _placement(spec: PipelineSpec, sources, backend, dtypes, request: GenerationRequest | None):
    """Our executor for the plan (refusing before loading when nothing fits); on the CPU, plain residency."""
    from .pipeline import Resident

    if backend.device.type == "cpu" and spec.offload in ("auto", "resident"):
        return Resident(backend.device), None  # host memory is the device: moving weights would only copy them
    from .offload import Executor

    plan = plan_memory(sources, backend, dtypes, request, spec.offload, spec.vram)
    require_fit(plan)
    return Executor(plan, backend), plan


def open_pipeline(
    spec: PipelineSpec,
    *,
    backend=None,
    placement=None,
    request: GenerationRequest | None = None,
    on_load: Callable[[LoadEvent], None] | None = None,
) -> Session:
    """Open a pipeline for `spec`. `backend`/`placement`: a host's own (SD.Next); `request`: what the memory plan
    is made for (it degrades on OOM later); `on_load`: called before and after each component loads."""
    from .engine import load_components
    from .precision import choose_dtypes

    backend = backend or select_backend(spec.device)
    prior, decoder, sources = open_sources(spec)
    dtypes = choose_dtypes(backend, spec.dtype)
    plan = None
    if placement is None:
        placement, plan = _placement(spec, sources, backend, dtypes, request)
    from .sizing import sizes_from_sources

    weights = sizes_from_sources(sources, dtypes).weights
    seconds: dict[str, float] = {}

    def report(component: str, index: int, elapsed: float | None) -> None:
        if elapsed is not None:
            seconds[component] = elapsed
        if on_load is not None:
            on_load(LoadEvent(component, index, len(COMPONENTS), weights[component], dtypes[component], elapsed))

    pipe = load_components(sources, backend=backend, dtypes=dtypes, placement=placement, report=report,
                           side_files=spec.side_files())
    return Session(spec, prior, decoder, backend, sources, dtypes, plan, pipe, list(sources.notes), seconds)

