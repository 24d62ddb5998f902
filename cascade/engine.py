"""Loading the components of a resolved `Sources` into a `CascadePipeline` (the step `cascade.session` runs).

cascade.precision decides dtypes per stage (Stage C bf16 where native, else fp32 — never fp16 unless asked; Stage B
bf16/fp16) and where things run; the placement (cascade.memory) decides what is resident when.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .loader import Sources, load_part
from .names import COMPONENT_OF_PART
from .pipeline import CascadePipeline, Placement, Resident

log = logging.getLogger(__name__)

@dataclass
class LoadReport:
    """What was loaded from where, at which dtype, and how long it took."""

    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_components(
    sources: Sources,
    *,
    backend,
    dtypes: dict[str, torch.dtype],
    placement: Placement,
    report: Callable[[str, int, float | None], None] | None = None,
    side_files=None,
) -> CascadePipeline:
    """Load every component of `sources` at its dtype where the placement wants it, then wrap them in a pipeline.

    `report(component, index, seconds)` is called before (seconds None) and after each component. Callers come
    through `cascade.session.open_pipeline`, which decides sources, dtypes and placement.
    """
    from .attention import bound_attention
    from .paths import cache_dir
    from .precision import openvino_precision
    from .text import load_tokenizer

    modules = {}
    for index, (kind, part) in enumerate(sources.parts().items(), start=1):
        name = COMPONENT_OF_PART[kind]
        if report is not None:
            report(name, index, None)
        t0 = time.perf_counter()
        modules[name] = load_part(part, dtype=dtypes[name], device=placement.initial_device(name),
                                  pin_memory=placement.pins_host_memory(name))
        seconds = time.perf_counter() - t0
        log.info("loaded %s (%s, %s) in %.1fs", name, part.variant, dtypes[name], seconds)
        if report is not None:
            report(name, index, seconds)
    for name in ("prior", "decoder"):
        bound_attention(modules[name], backend.max_attention_bytes)
    cache = cache_dir() / "openvino"
    for name, entry in (("prior", "forward"), ("decoder", "forward"), ("vqgan", "decode")):
        modules[name] = backend.compile_for_device(modules[name], cache_dir=cache, entry=entry,
                                                   precision=openvino_precision(backend, name, dtypes[name]))
    return CascadePipeline(
        tokenizer=load_tokenizer(),
        text_encoder=modules["text_encoder"],
        prior=modules["prior"],
        decoder=modules["decoder"],
        stage_a=modules["vqgan"],
        device=backend.device,
        placement=placement,
        sources=sources,
        backend=backend,
        side_files=side_files,
    )


def load_pipeline(
    prior: str | Path,
    decoder: str | Path,
    *,
    text_encoder: str | Path | None = None,
    stage_a: str | Path | None = None,
    backend=None,
    dtype: torch.dtype | None = None,
    placement: Placement | None = None,
) -> tuple[CascadePipeline, LoadReport]:
    """Shorthand for `cascade.session.open_pipeline` with explicit paths (tests, benchmarks, notebooks).

    Without a placement everything is resident on the backend's device (no memory plan).
    """
    from cascade_backends import select_backend

    from .session import PipelineSpec, open_pipeline

    backend = backend or select_backend()
    spec = PipelineSpec(prior, decoder, text_encoder, stage_a, dtype=dtype or "auto")
    session = open_pipeline(spec, backend=backend, placement=placement or Resident(backend.device))
    return session.pipeline, LoadReport(session.dtypes, session.load_seconds, session.notes)
