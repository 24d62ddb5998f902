"""SD.Next's request fields and the extension's settings -> the engine's stage settings. Pure functions, no SD.Next.

Field mapping (SD.Next's own Stable Cascade convention, modules/processing_args.py):
    steps -> prior steps, cfg_scale -> prior CFG, sampler_name -> prior sampler ("Default" = the model card's
    DDPM on SGM Uniform), refiner_steps -> decoder steps, cfg_image -> decoder CFG.
Everything SD.Next has no field for (prior schedule and shift, decoder sampler/schedule/shift, compression,
Stage A scale) comes from the extension's settings, overridable per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

from cascade.api_fields import resolve_seed
from cascade.errors import InvalidRequestError
from cascade.names import DEFAULT_NAME, UnknownNameError, resolve_sampler, resolve_scheduler
from cascade.request import (REQUEST_MAX_BYTES, REQUEST_MAX_PIXELS, SIZE_MULTIPLE, STAGE_A_SCALE, StageSettings,
                             default_decoder, default_prior)



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
    # "cpu": image i of a batch uses seed + i on any device (A1111/SD.Next users' convention, and what SD.Next's own
    # pipelines do); "comfyui": ComfyUI's KSampler noise, for the same image as a ComfyUI render (README).
    noise: str = "cpu"


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
    """SD.Next's sampler name for Stage C -> canonical engine sampler (cascade.names: "Default" is the model card's,
    "KDPM2", "DPM SDE" and every other spelling SD.Next uses); unknown ones raise with the list that works."""
    try:
        return resolve_sampler(name or DEFAULT_NAME, "prior")
    except UnknownNameError as e:
        raise InvalidRequestError(f"Sampler {name!r} is not available for Stable Cascade: {e}") from None


def _scheduler(name: str, what: str, stage: str) -> str:
    try:
        return resolve_scheduler(name, stage)
    except UnknownNameError as e:
        raise InvalidRequestError(f"{what}: {e}") from None


def _sampler(name: str, what: str, stage: str) -> str:
    try:
        return resolve_sampler(name, stage)
    except UnknownNameError as e:
        raise InvalidRequestError(f"{what}: {e}") from None


def prior_stage(steps: int, cfg: float, sampler_name: str | None, settings: CascadeSettings) -> StageSettings:
    """Stage C settings from SD.Next's steps / cfg_scale / sampler_name plus the extension's schedule and shift."""
    return StageSettings(
        steps=int(steps),
        cfg=float(cfg),
        sampler=resolve_sdnext_sampler(sampler_name),
        scheduler=_scheduler(settings.prior_scheduler, "prior schedule (cascade_prior_scheduler)", "prior"),
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
        sampler=_sampler(settings.decoder_sampler, "decoder sampler (cascade_decoder_sampler)", "decoder"),
        scheduler=_scheduler(settings.decoder_scheduler, "decoder schedule (cascade_decoder_scheduler)", "decoder"),
        shift=float(settings.decoder_shift),
    )


def infotext_fields(prior: StageSettings, decoder: StageSettings, settings: CascadeSettings,
                    decoder_name: str | None) -> dict[str, Any]:
    """Fields for SD.Next's infotext (`p.extra_generation_params`); keys match SD.Next's `[\\w ]+` rule.

    The same names and values the CLI writes (cascade.infotext.generation_fields); "Refiner steps" and "Image CFG
    scale" are the names SD.Next's paste maps back to refiner_steps / cfg_image, so "send to txt2img" restores the
    decoder's steps and CFG. "CFG scale" is the CFG used: SD.Next leaves it out when the UI sent its default (-1).
    """
    from cascade.infotext import generation_fields

    return generation_fields(prior, decoder, compression=settings.compression, stage_a_scale=settings.stage_a_scale,
                             decoder_name=decoder_name)


# --- SD.Next's hires fix and per-request image prompts ----------------------------------------------------------
IMAGE_PROMPTS_KEY = "cascade_image_prompts"  # `extra`: a list of base64 images (image variations / image prompts)
IMAGE_PROMPT_STRENGTH_KEY = "cascade_image_prompt_strength"  # `extra` or Settings: their weight (default 1.0)


def hires_upscale(enable_hr: bool, hr_scale: Any, hr_resize_x: Any, hr_resize_y: Any, width: int, height: int) -> int:
    """SD.Next's hires fix -> the Stage B upscale factor (1 when hires is off): for Stable Cascade, "hires" is Stage
    B rendering at a whole multiple of the size from the same Stage C latent (what ComfyUI users do for 2048+ pixels),
    not a second img2img pass. Hires scale (or the resize-to width/height) must give a whole factor up to 4."""
    from cascade.request import MAX_UPSCALE

    if not enable_hr:
        return 1
    targets = [(x, side) for x, side in ((hr_resize_x, width), (hr_resize_y, height)) if x]
    factors = {float(x) / side for x, side in targets} if targets else {float(hr_scale)}
    factor = factors.pop() if len(factors) == 1 else None
    if factor is None or not factor.is_integer() or not 1 <= factor <= MAX_UPSCALE:
        asked = f"resize to {hr_resize_x}x{hr_resize_y}" if targets else f"scale {hr_scale}"
        raise InvalidRequestError(
            f"Hires fix with Stable Cascade renders Stage B at a whole multiple of the size (2, 3 or 4); {asked} of "
            f"{width}x{height} is not one: set Hires scale to 2 (and leave resize at 0), or turn hires off")
    return int(factor)


def number(value: Any, key: str) -> float:
    """An option or `extra` value that must be a finite number (SD.Next may hand it over as text)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{key}={value!r} is not a number") from None
    if not math.isfinite(out):
        raise InvalidRequestError(f"{key}={value!r} must be a finite number")
    return out


def decode_image_prompts(value: Any, max_pixels: int = REQUEST_MAX_PIXELS, max_bytes: int = REQUEST_MAX_BYTES) -> tuple:
    """`extra: {"cascade_image_prompts": [base64, ...]}` -> PIL images (a request never names files)."""
    from cascade.images import decode_base64_image

    if value in (None, "", [], ()):
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise InvalidRequestError(f"{IMAGE_PROMPTS_KEY} must be a list of base64-encoded images")
    return tuple(decode_base64_image(item, max_pixels, max_bytes, f"image prompt {i + 1}") for i, item in enumerate(items))


# --- SD.Next's conventions for seeds, CFG and sizes ------------------------------------------------------------------
REQUESTED_SIZE_ATTR = "cascade_requested_size"  # (width, height) before SD.Next rounded them (remember_requested_size)


def resolve_seeds(seeds: Sequence[Any], draw: Callable[[], int] | None = None) -> list[int]:
    """SD.Next's per-image seeds -> the seeds that will be used (cascade.api_fields.resolve_seed: -1 alone means
    random, drawn here so the seed used can be reported; any other negative, oversized or non-integer seed is refused,
    where SD.Next would pass -5 on to torch, which silently remaps it)."""
    return [resolve_seed(seed, draw) for seed in seeds]


def remember_requested_size(p: Any) -> None:
    """Record p.width/p.height as the user sent them. Called from the Script's `before_process`, which SD.Next runs
    before it rounds both down to a multiple of its VAE scale factor (modules/processing.py process_images)."""
    width, height = getattr(p, "width", None), getattr(p, "height", None)
    if isinstance(width, int) and isinstance(height, int):
        setattr(p, REQUESTED_SIZE_ATTR, (width, height))


def check_requested_size(width: int, height: int, requested: tuple[int, int] | None) -> None:
    """Refuse a size SD.Next changed from what the user sent when that was not a multiple of 128, in the user's
    numbers ("width 500 (SD.Next made it 496)"): the engine's own message would name only SD.Next's rounded value,
    and a rounding that happened to land on a multiple of 128 would silently give another size than asked for."""
    if requested is None:
        return
    problems = []
    for name, sent, used in (("width", requested[0], width), ("height", requested[1], height)):
        if sent != used and sent % SIZE_MULTIPLE:
            lo = max(SIZE_MULTIPLE, sent // SIZE_MULTIPLE * SIZE_MULTIPLE)
            nearest = f"{lo}" if lo >= sent else f"{lo} or {lo + SIZE_MULTIPLE}"
            problems.append(f"{name} {sent} (SD.Next rounded it to {used}) is not a multiple of {SIZE_MULTIPLE} "
                            f"(nearest valid: {nearest})")
    if problems:
        raise InvalidRequestError("Invalid request: " + "; ".join(problems) + ".")
