"""Loading inside SD.Next: our descriptor folders, and any single .safetensors file SD.Next routes to Stable Cascade,
become a `StableCascadeSingleFilePipeline`; everything else (diffusers folders, hub repos) goes to SD.Next's own
Stable Cascade loader.

A load that fails never returns None (SD.Next would then run its generic loaders on the folder and fail with a
confusing message), and it does not raise either: SD.Next turns a raised load error into "model not loaded", logs
it, and then answers every /sdapi/v1/txt2img with HTTP 200 and zero images ("Aborted: model not loaded") — the
silent failure this extension must not produce. Instead the error is logged and an *unavailable* model is
returned whose every generation raises the load error (HTTP 4xx/5xx with the message, or the UI's error box).
Selecting another model replaces it as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from cascade.errors import CascadeError, MissingComponentError, WrongStageError

from . import descriptors, library, logs
from .errors import CascadeHostError, host_error
from .offload import SdnextOffload

log = logging.getLogger(__name__)


def claims(checkpoint_info: Any) -> bool:
    """Is this SD.Next checkpoint ours: one of our descriptor folders, or any single .safetensors file SD.Next routes
    to Stable Cascade (its own loader can only load diffusers folders and hub repos)?"""
    path = Path(str(getattr(checkpoint_info, "path", "") or ""))
    if path.is_dir():
        return descriptors.is_ours(path)
    return path.is_file() and path.suffix.lower() == ".safetensors"


def _pair_for_file(path: Path, default_decoder: str | None) -> tuple[Path, Path]:
    entry = library.classify(path)
    if entry.error:
        raise CascadeHostError(f"{path.name}: {entry.error}", 422)
    if entry.role == "stage_b":
        raise WrongStageError(
            f"{path.name} is a {entry.title} file, not a model on its own: select the Stage C ('main') file it "
            "belongs to. In the Stable Cascade folder each Stage C + Stage B pair is listed as 'Diffusers/<Stage C "
            "name>'."
        )
    if entry.role != "stage_c":
        raise WrongStageError(f"{path.name} is a {entry.title} file, not a Stage C ('main') model file.")
    lib = library.scan_library(path.parent, default_decoder)
    pair = next((p for p in lib.pairs if p.prior.resolve() == path.resolve()), None)
    if pair is None:
        problems = [p for p in lib.problems if path.name in p] or lib.problems
        raise MissingComponentError(f"No Stage B (decoder) for {path.name}: " + " ".join(problems))
    return pair.prior, pair.decoder


def resolve_paths(checkpoint_info: Any, default_decoder: str | None) -> tuple[str, Path, Path]:
    """(model name, Stage C path, Stage B path) for a checkpoint this extension claims."""
    path = Path(str(checkpoint_info.path))
    if path.is_dir():
        desc = descriptors.read_descriptor(path)
        if desc is None:
            raise MissingComponentError(f"{path} is not a Stable Cascade descriptor folder")
        for role, file in (("Stage C", desc.prior), ("Stage B", desc.decoder)):
            if not file.is_file():
                raise MissingComponentError(
                    f"The {role} file {file} of the model {path.name!r} is gone. Put it back, or rescan the Stable "
                    "Cascade folder (Settings > Stable Cascade, or POST /cascade/v1/refresh)."
                )
        return path.name, desc.prior, desc.decoder
    prior, decoder = _pair_for_file(path, default_decoder)
    return prior.stem, prior, decoder


def build_pipeline(name: str, prior: Path, decoder: Path):
    """Load the pair on SD.Next's device with SD.Next's dtype choice and the memory policy of its offload mode:
    SD.Next's offload moves the weights when its mode is set; with mode `none` the engine's planner does."""
    from modules import devices, shared, sd_models

    from cascade.session import PipelineSpec, open_pipeline

    from .host import SdnextHost, sdnext_backend
    from .pipeline import StableCascadeSingleFilePipeline

    backend = sdnext_backend(devices)
    mode = shared.opts.diffusers_offload_mode
    dtype = requested_dtype(devices, shared.opts)
    placement = None  # mode none: cascade.session plans for the card's size (it degrades on OOM later)
    if mode != "none":
        placement = SdnextOffload(mode, backend.device,
                                  lambda: sd_models.apply_balanced_offload(shared.sd_model, silent=True))
    session = open_pipeline(PipelineSpec(prior, decoder, dtype=dtype or "auto"), backend=backend, placement=placement)
    for note in session.notes:
        log.info("Stable Cascade %s: %s", name, note)
    host = SdnextHost(decoder_name=decoder.name, offload_mode=mode)
    pipe = StableCascadeSingleFilePipeline.from_engine(session.pipeline, host=host)
    log.info("Stable Cascade: loaded %r (prior %s, decoder %s) on %s, dtypes %s, memory %s", name, prior.name,
             decoder.name, backend.device, {k: str(v).removeprefix("torch.") for k, v in session.dtypes.items()},
             session.placement_name)
    return pipe


def requested_dtype(devices: Any, opts: Any):
    """SD.Next's compute dtype for the UNets, except that an automatic fp16 never reaches Stage C (it overflows):
    then our policy picks bf16 where native, else fp32. An explicit FP16 setting is honoured."""
    import torch

    dtype = getattr(devices, "dtype_unet", None) or devices.dtype
    if dtype == torch.float16 and str(getattr(opts, "cuda_dtype", "Auto")).upper() != "FP16":
        return None
    return dtype


def load(checkpoint_info: Any, diffusers_load_config: dict | None, original: Callable, default_decoder: str | None):
    """The body of the wrapped `load_cascade_combined`."""
    if not claims(checkpoint_info):
        return original(checkpoint_info, diffusers_load_config)
    from .pipeline import StableCascadeSingleFilePipeline

    logs.route()
    name = getattr(checkpoint_info, "name", None) or str(checkpoint_info.path)
    try:
        model_name, prior, decoder = resolve_paths(checkpoint_info, default_decoder)
        return build_pipeline(model_name, prior, decoder)
    except Exception as e:
        error = host_error(e, f"loading {name!r}")
        if error.status_code >= 500 and not isinstance(e, CascadeError):
            log.exception("Stable Cascade: loading %r failed", name)
        log.error("%s", error)
        return StableCascadeSingleFilePipeline.unavailable(error)
