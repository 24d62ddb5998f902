"""SD.Next's request fields and the extension's settings -> the engine's stage settings. Pure functions, no SD.Next.

Field mapping (SD.Next's own Stable Cascade convention, modules/processing_args.py):
    steps -> prior steps, cfg_scale -> prior CFG, sampler_name -> prior sampler ("Default" = the model card's
    DDPM on SGM Uniform), refiner_steps -> decoder steps, cfg_image -> decoder CFG.
Everything SD.Next has no field for (prior schedule and shift, decoder sampler/schedule/shift, compression,
Stage A scale) comes from the extension's settings, overridable per request.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from cascade import sampling
from cascade.errors import InvalidRequestError
from cascade.infotext import SAMPLER_TITLES, SCHEDULER_TITLES
from cascade.request import STAGE_A_SCALE, StageSettings, default_decoder, default_prior

# SD.Next sampler names that cascade.sampling does not know under that spelling.
SDNEXT_SAMPLERS = {"default": "ddpm", "kdpm2": "dpm_2", "dpm sde": "dpmpp_sde"}


@dataclass(frozen=True)
class CascadeSettings:
    """The extension's per-generation settings; defaults are the Stable Cascade / SoteDiffusion model card's."""

    prior_scheduler: str = default_prior().scheduler
    prior_shift: float = default_prior().shift
    decoder_sampler: str = default_decoder().sampler
    decoder_scheduler: str = default_decoder().scheduler
    decoder_shift: float = default_decoder().shift
    compression: float = 42.0
    stage_a_scale: float = STAGE_A_SCALE


# Setting name -> SD.Next option key (Settings > Stable Cascade; also `override_settings` and `extra` keys).
OPTION_KEYS = {f.name: f"cascade_{f.name}" for f in fields(CascadeSettings)}


def resolve_settings(lookup: Callable[[str], Any]) -> CascadeSettings:
    """Build settings from `lookup(option_key)` (None = not set): per-request values first, then options."""
    base = CascadeSettings()
    values = {}
    for name, key in OPTION_KEYS.items():
        value = lookup(key)
        if value is None or value == "":
            continue
        default = getattr(base, name)
        try:
            values[name] = type(default)(value)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"{key}={value!r} is not a valid {type(default).__name__}") from None
    return replace(base, **values)


def resolve_sdnext_sampler(name: str | None) -> str:
    """SD.Next's sampler name -> canonical engine sampler; unknown ones raise with the list that works."""
    if name is None or name == "":
        return SDNEXT_SAMPLERS["default"]
    key = name.strip().lower()
    if key in SDNEXT_SAMPLERS:
        return SDNEXT_SAMPLERS[key]
    try:
        return sampling.resolve_sampler(name)
    except ValueError:
        usable = ["Default", *sorted(SAMPLER_TITLES.values())]
        raise InvalidRequestError(
            f"Sampler {name!r} is not available for Stable Cascade; use one of: {', '.join(usable)} "
            "(Default = DDPM on SGM Uniform, the model card's prior sampler)."
        ) from None


def _scheduler(name: str, what: str) -> str:
    try:
        return sampling.resolve_scheduler(name)
    except ValueError as e:
        raise InvalidRequestError(f"{what}: {e}") from None


def _sampler(name: str, what: str) -> str:
    try:
        return sampling.resolve_sampler(name)
    except ValueError as e:
        raise InvalidRequestError(f"{what}: {e}") from None


def prior_stage(steps: int, cfg: float, sampler_name: str | None, settings: CascadeSettings) -> StageSettings:
    """Stage C settings from SD.Next's steps / cfg_scale / sampler_name plus the extension's schedule and shift."""
    return StageSettings(
        steps=int(steps),
        cfg=float(cfg),
        sampler=resolve_sdnext_sampler(sampler_name),
        scheduler=_scheduler(settings.prior_scheduler, "prior schedule (cascade_prior_scheduler)"),
        shift=float(settings.prior_shift),
    )


def decoder_stage(steps: int, cfg: float, settings: CascadeSettings) -> StageSettings:
    """Stage B settings from SD.Next's refiner_steps / cfg_image plus the extension's decoder settings."""
    if int(steps) < 1:
        raise InvalidRequestError(
            f"decoder steps {steps} must be at least 1: SD.Next's 'Refiner steps' (refiner_steps) are the Stable "
            "Cascade decoder's steps (the model card uses 10)."
        )
    return StageSettings(
        steps=int(steps),
        cfg=float(cfg),
        sampler=_sampler(settings.decoder_sampler, "decoder sampler (cascade_decoder_sampler)"),
        scheduler=_scheduler(settings.decoder_scheduler, "decoder schedule (cascade_decoder_scheduler)"),
        shift=float(settings.decoder_shift),
    )


def _num(value: float) -> str:
    return f"{value:g}"


def infotext_fields(prior: StageSettings, decoder: StageSettings, settings: CascadeSettings,
                    decoder_name: str | None) -> dict[str, Any]:
    """Fields for SD.Next's infotext (`p.extra_generation_params`); keys match SD.Next's `[\\w ]+` rule.

    "Refiner steps" and "Image CFG scale" are the names SD.Next's paste maps back to refiner_steps / cfg_image,
    so "send to txt2img" restores the decoder's steps and CFG.
    """
    out: dict[str, Any] = {
        "Prior sampler": SAMPLER_TITLES.get(prior.sampler, prior.sampler),
        "Prior schedule": SCHEDULER_TITLES.get(prior.scheduler, prior.scheduler),
        "Prior shift": _num(prior.shift),
        "Refiner steps": decoder.steps,
        "Image CFG scale": _num(decoder.cfg),
        "Decoder sampler": SAMPLER_TITLES.get(decoder.sampler, decoder.sampler),
        "Decoder schedule": SCHEDULER_TITLES.get(decoder.scheduler, decoder.scheduler),
        "Decoder shift": _num(decoder.shift),
        "Compression": _num(settings.compression),
        "Decoder": decoder_name,
    }
    if settings.stage_a_scale != STAGE_A_SCALE:
        out["Stage A scale"] = _num(settings.stage_a_scale)
    return {k: v for k, v in out.items() if v is not None}
