"""From checkpoint paths to a ready `CascadePipeline`: resolve sources, choose dtypes, load, place.

The backend decides dtypes per stage (Stage C bf16 where native, else fp32 — never fp16 unless asked; Stage B
bf16/fp16) and where things run; the placement (cascade.memory) decides what is resident when.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .loader import Sources, load_part, resolve_sources
from .pipeline import COMPONENT_OF_PART, CascadePipeline, Placement, Resident

log = logging.getLogger(__name__)

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'auto'/None -> None (backend policy); 'bf16', 'fp16', 'fp32' -> torch dtypes."""
    if name is None or name == "auto":
        return None
    try:
        return _DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, bf16, fp16 or fp32") from None


@dataclass
class LoadReport:
    """What was loaded from where, at which dtype, and how long it took."""

    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def choose_dtypes(backend, requested: torch.dtype | None) -> dict[str, torch.dtype]:
    """Per-component dtypes from the backend policy; `requested` applies to the two UNets only."""
    return {
        "text_encoder": backend.dtype_for("text_encoder"),
        "prior": backend.dtype_for("prior", requested),
        "decoder": backend.dtype_for("decoder", requested),
        "vqgan": backend.dtype_for("vqgan"),
    }


def load_pipeline(
    prior: str | Path,
    decoder: str | Path,
    *,
    text_encoder: str | Path | None = None,
    stage_a: str | Path | None = None,
    backend=None,
    dtype: torch.dtype | None = None,
    placement: Placement | None = None,
    sources: Sources | None = None,
) -> tuple[CascadePipeline, LoadReport]:
    """Load a Stage C + Stage B pair (plus CLIP-G and Stage A from wherever they are) onto the backend's device."""
    from backends import select_backend

    from .attention import bound_attention
    from .text import load_tokenizer
    from .tiny import cache_dir

    backend = backend or select_backend()
    sources = sources or resolve_sources(prior, decoder, text_encoder=text_encoder, stage_a=stage_a)
    report = LoadReport(dtypes=choose_dtypes(backend, dtype), notes=list(sources.notes))
    placement = placement or Resident(backend.device)
    modules = {}
    for kind, part in sources.parts().items():
        name = COMPONENT_OF_PART[kind]
        t0 = time.perf_counter()
        modules[name] = load_part(part, dtype=report.dtypes[name], device=placement.initial_device(name),
                                  pin_memory=placement.pins_host_memory(name))
        report.seconds[name] = time.perf_counter() - t0
        log.info("loaded %s (%s, %s) in %.1fs", name, part.variant, report.dtypes[name], report.seconds[name])
    for name in ("prior", "decoder"):
        bound_attention(modules[name], backend.max_attention_bytes)
    cache = cache_dir() / "openvino"
    for name, entry in (("prior", "forward"), ("decoder", "forward"), ("vqgan", "decode")):
        modules[name] = backend.compile_for_device(modules[name], name, cache_dir=cache, entry=entry)
    pipe = CascadePipeline(
        tokenizer=load_tokenizer(),
        text_encoder=modules["text_encoder"],
        prior=modules["prior"],
        decoder=modules["decoder"],
        stage_a=modules["vqgan"],
        device=backend.device,
        placement=placement,
        sources=sources,
        backend=backend,
    )
    return pipe, report
