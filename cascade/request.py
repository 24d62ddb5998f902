"""What one generation asks for, validated before anything runs.

Defaults are the SoteDiffusion / Stable Cascade model card's (reference §4.7): prior DDPM on SGM Uniform, 30
steps, CFG 7, shift 2; decoder Euler a on Karras, 10 steps, CFG 1.0, shift 1; compression 42; sizes in
multiples of 128. Sizes that are not multiples of 128 are rejected with the nearest valid sizes in the message
rather than silently rounded, so the image you get is always the size you asked for.
"""

from __future__ import annotations

import dataclasses
import math
import random
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import InvalidRequestError
from .names import NOISE_MODES

SIZE_MULTIPLE = 128
MAX_SIDE = 4096
COMPRESSION_RANGE = (16.0, 128.0)
MAX_STEPS = 1000  # ComfyUI's KSampler allows 10000; past ~200 nothing changes but the time taken
MAX_BATCH = 64
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range (and ComfyUI's seed widget)
MAX_CFG = 100.0  # ComfyUI's KSampler limit; far beyond it the guided prediction overflows to a black image
MAX_SHIFT = 100.0
MAX_STAGE_A_SCALE = 10.0
REQUEST_MAX_PIXELS = MAX_SIDE * MAX_SIDE  # default bound on an image sent in a request (the largest output)
REQUEST_MAX_BYTES = 32 << 20  # default bound on a request image's encoded size
MAX_UPSCALE = 4  # Stage B at upscale x the request's size; the output side stays <= MAX_SIDE
MAX_IMAGE_PROMPTS = 16  # each adds 4 tokens to Stage C's context
IMAGE_PROMPT_STRENGTH_RANGE = (-10.0, 10.0)  # ComfyUI unCLIPConditioning's strength widget
STAGE_A_SCALE = 0.43  # original code and ComfyUI; diffusers' config says 0.3764 (reference §3.4)


@dataclass(frozen=True)
class StageSettings:
    """Sampling settings of one stage."""

    steps: int
    cfg: float
    sampler: str
    scheduler: str
    shift: float
    denoise: float = 1.0


def default_prior() -> StageSettings:
    return StageSettings(steps=30, cfg=7.0, sampler="ddpm", scheduler="sgm_uniform", shift=2.0)


def default_decoder() -> StageSettings:
    return StageSettings(steps=10, cfg=1.0, sampler="euler_ancestral", scheduler="karras", shift=1.0)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. `seed=-1` draws a random seed; image i of the batch uses seed + i.

    Image inputs are PIL images (`cascade.images.load_image(path)` opens files): `image` starts Stage C from its
    encoding at strength `prior.denoise` (img2img); `decoder_image` starts Stage B from its Stage A encoding at
    `decoder.denoise`; `image_prompts` condition Stage C through CLIP-L vision (`clip_img`, ComfyUI's unCLIP path),
    each scaled by `image_prompt_strength`. `upscale` renders Stage B (and so the output) at that multiple of the
    size from the same Stage C latent. `preview_every` N puts a preview image on every N-th StepEvent of both
    stages (and the last one); 0 = none.
    """

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    seed: int = -1
    batch_size: int = 1
    prior: StageSettings = field(default_factory=default_prior)
    decoder: StageSettings = field(default_factory=default_decoder)
    compression: float = 42.0
    stage_a_scale: float = STAGE_A_SCALE
    cfg_rescale: float = 0.0
    image: Any = None
    decoder_image: Any = None
    upscale: int = 1
    image_prompts: tuple = ()
    image_prompt_strength: float = 1.0
    preview_every: int = 0
    decoder_seed: int | None = None
    noise: str = "cpu"
    prompt_syntax: str = "a1111"  # prompt-weight syntax, cascade.prompts.SYNTAXES: "a1111" (SD.Next) or "comfyui"
    loras: tuple = ()  # (path, unet weight, text-encoder weight or None = unet weight) per LoRA (cascade.lora_apply)
    controlnets: tuple = ()  # (path, image, strength, start, end[, mask]) per Stage C ControlNet (cascade.controlnet)

    def __post_init__(self) -> None:
        if not isinstance(self.loras, tuple):
            object.__setattr__(self, "loras", tuple(self.loras or ()))
        if not isinstance(self.controlnets, tuple):
            object.__setattr__(self, "controlnets", tuple(self.controlnets or ()))
        prompts = self.image_prompts
        if prompts is None:
            object.__setattr__(self, "image_prompts", ())
        elif isinstance(prompts, list):
            object.__setattr__(self, "image_prompts", tuple(prompts))
        elif not isinstance(prompts, tuple):
            object.__setattr__(self, "image_prompts", (prompts,))

    def with_seed(self) -> "GenerationRequest":
        """The same request with concrete seeds (a random one where seed / decoder_seed is -1)."""
        out = self
        if out.seed < 0:
            out = replace(out, seed=random.randrange(0, 2**32 - 1))
        if out.decoder_seed is not None and out.decoder_seed < 0:
            out = replace(out, decoder_seed=random.randrange(0, 2**32 - 1))
        return out

    @property
    def seeds(self) -> list[int]:
        """Stage C seeds of the images: seed + i ("cpu" noise; in "comfyui" noise mode `seed` seeds the batch)."""
        return [self.seed + i for i in range(self.batch_size)]

    @property
    def decoder_seeds(self) -> list[int]:
        """Stage B seeds: `decoder_seed` + i, or the Stage C seeds when it is None (one seed for both stages)."""
        base = self.seed if self.decoder_seed is None else self.decoder_seed
        return [base + i for i in range(self.batch_size)]

    def prior_latent_shape(self) -> tuple[int, int, int, int]:
        """Stage C latent (B, 16, H//c, W//c), ComfyUI's StableCascade_EmptyLatentImage rule."""
        c = self.compression
        return (self.batch_size, 16, int(self.height // c), int(self.width // c))

    def decoder_latent_shape(self) -> tuple[int, int, int, int]:
        """Stage B latent (B, 4, H/4, W/4) of the output size (`upscale` x the request's)."""
        width, height = self.output_size
        return (self.batch_size, 4, height // 4, width // 4)

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images this request produces."""
        upscale = self.upscale if isinstance(self.upscale, int) and self.upscale >= 1 else 1
        return self.width * upscale, self.height * upscale


def _nearest(value: int) -> str:
    lo = max(SIZE_MULTIPLE, (value // SIZE_MULTIPLE) * SIZE_MULTIPLE)
    hi = lo + SIZE_MULTIPLE if lo < value else lo
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def validate(request: GenerationRequest) -> None:
    """Raise InvalidRequestError naming every problem and the fix.

    Every number is bounded: a non-finite float, a seed past 2^64-1 or a step count in the millions would otherwise
    run (for hours, or into a black image) instead of being refused.
    """
    problems = []
    for name, value in (("width", request.width), ("height", request.height)):
        if value % SIZE_MULTIPLE or value < SIZE_MULTIPLE:
            problems.append(f"{name} {value} is not a multiple of {SIZE_MULTIPLE} (nearest valid: {_nearest(value)})")
        elif value > MAX_SIDE:
            problems.append(f"{name} {value} is larger than {MAX_SIDE}")
    lo, hi = COMPRESSION_RANGE
    if not _finite(request.compression) or not lo <= request.compression <= hi:
        problems.append(f"compression {request.compression} is outside {lo:g}-{hi:g} (the model card uses 42, 32-64)")
    elif min(request.prior_latent_shape()[2:]) < 1:
        problems.append(f"compression {request.compression} leaves no Stage C latent at {request.width}x{request.height}")
    if not 1 <= request.batch_size <= MAX_BATCH:
        problems.append(f"batch size {request.batch_size} must be between 1 and {MAX_BATCH}")
    if request.seed != -1 and not 0 <= request.seed <= MAX_SEED:
        problems.append(f"seed {request.seed} must be -1 (random) or between 0 and {MAX_SEED} (2^64-1)")
    elif request.noise != "comfyui" and request.seed > MAX_SEED - (request.batch_size - 1):
        problems.append(f"seed {request.seed} + batch {request.batch_size} passes {MAX_SEED} (2^64-1): use a smaller seed")
    if not _finite(request.cfg_rescale) or not 0 <= request.cfg_rescale <= 1:
        problems.append(f"cfg rescale {request.cfg_rescale} must be between 0 and 1")
    if not _finite(request.stage_a_scale) or not 0 < request.stage_a_scale <= MAX_STAGE_A_SCALE:
        problems.append(f"Stage A scale {request.stage_a_scale} must be in (0, {MAX_STAGE_A_SCALE:g}] "
                        f"(0.43 original and ComfyUI, 0.3764 diffusers)")
    for stage_name, stage in (("prior", request.prior), ("decoder", request.decoder)):
        if not 1 <= stage.steps <= MAX_STEPS:
            problems.append(f"{stage_name} steps {stage.steps} must be between 1 and {MAX_STEPS}")
        if not _finite(stage.cfg) or not 0 <= stage.cfg <= MAX_CFG:
            problems.append(f"{stage_name} CFG {stage.cfg} must be between 0 and {MAX_CFG:g}")
        if not _finite(stage.shift) or not 0 < stage.shift <= MAX_SHIFT:
            problems.append(f"{stage_name} shift {stage.shift} must be in (0, {MAX_SHIFT:g}]")
        if not _finite(stage.denoise) or not 0 < stage.denoise <= 1:
            problems.append(f"{stage_name} denoise {stage.denoise} must be in (0, 1]")
    problems += _image_problems(request)
    problems += _reproduction_problems(request)
    problems += _lora_problems(request)
    if request.controlnets:
        from .controlnet import entry_problems

        problems += entry_problems(request.controlnets)
    if problems:
        raise InvalidRequestError("Invalid request: " + "; ".join(problems) + ".")


MAX_LORA_WEIGHT = 100.0  # ComfyUI LoraLoader's strength range


def _lora_problems(request: GenerationRequest) -> list[str]:
    """Each LoRA a (path, unet weight[, text-encoder weight]) with finite weights (the files are read later)."""
    from .lora_apply import MAX_LORAS, as_entry

    problems = []
    if len(request.loras) > MAX_LORAS:
        problems.append(f"{len(request.loras)} LoRAs: at most {MAX_LORAS}")
    for i, item in enumerate(request.loras):
        try:
            entry = as_entry(item)
        except TypeError as err:
            problems.append(f"LoRA {i + 1}: {err}")
            continue
        if not entry.path:
            problems.append(f"LoRA {i + 1} has no file name")
        for what, w in (("weight", entry.unet), ("text-encoder weight", entry.text_encoder)):
            if w is not None and (isinstance(w, bool) or not _finite(w) or abs(w) > MAX_LORA_WEIGHT):
                problems.append(f"LoRA {i + 1} {what} {w!r} must be a number from -{MAX_LORA_WEIGHT:g} to "
                                f"{MAX_LORA_WEIGHT:g}")
    return problems


def _reproduction_problems(request: GenerationRequest) -> list[str]:
    """The noise mode and the Stage B seed (issue 11: ComfyUI parity)."""
    problems = []
    from .prompts import SYNTAXES

    if request.prompt_syntax not in SYNTAXES:
        problems.append(f"prompt syntax {request.prompt_syntax!r} must be one of: {', '.join(SYNTAXES)}")
    if request.noise not in NOISE_MODES:
        problems.append(f"noise {request.noise!r} must be one of: {', '.join(NOISE_MODES)} (cpu = seed + i per "
                        "image on any device; comfyui = ComfyUI's noise for the batch)")
    seed = request.decoder_seed
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or (seed != -1 and not 0 <= seed <= MAX_SEED):
            problems.append(f"decoder seed {seed!r} must be -1 (random), empty (the seed) or between 0 and {MAX_SEED}")
        elif request.noise != "comfyui" and seed > MAX_SEED - (request.batch_size - 1):
            problems.append(f"decoder seed {seed} + batch {request.batch_size} passes {MAX_SEED} (2^64-1)")
    if request.noise == "comfyui":
        # ComfyUI's default_noise_sampler seeds seed + 1 on the CPU; at 2^64-1 it overflows (ComfyUI fails too).
        for what, value in (("seed", request.seed), ("decoder seed", seed)):
            if value == MAX_SEED:
                problems.append(f"{what} {MAX_SEED} cannot seed ComfyUI's ancestral noise (it seeds seed + 1): use a "
                                "smaller one")
    return problems


def _image_problems(request: GenerationRequest) -> list[str]:
    """Image inputs: each a usable image (cascade.images rules), a denoise below 1 only with an image to start
    from (it would otherwise silently shorten a text-to-image run), upscale and strengths in range."""
    from .images import ImageError, check_image

    problems = []
    inputs = [("init image", request.image), ("decoder image", request.decoder_image)]
    inputs += [(f"image prompt {i + 1}", im) for i, im in enumerate(request.image_prompts)]
    for what, image in inputs:
        if image is not None:
            try:
                check_image(image, what)
            except ImageError as err:
                problems.append(str(err))
    if _finite(request.prior.denoise) and request.prior.denoise < 1 and request.image is None:
        problems.append(f"prior denoise {request.prior.denoise:g} needs an init image to start from: pass --image "
                        "(request field `image`), or leave denoise at 1 for text-to-image")
    if _finite(request.decoder.denoise) and request.decoder.denoise < 1 and request.decoder_image is None:
        problems.append(f"decoder denoise {request.decoder.denoise:g} needs a decoder image to start from: pass "
                        "--decoder-image (request field `decoder_image`), or leave it at 1")
    if not isinstance(request.upscale, int) or isinstance(request.upscale, bool) or not 1 <= request.upscale <= MAX_UPSCALE:
        problems.append(f"upscale {request.upscale!r} must be a whole number from 1 to {MAX_UPSCALE}")
    elif max(request.output_size) > MAX_SIDE:
        width, height = request.output_size
        problems.append(f"upscale {request.upscale} of {request.width}x{request.height} gives {width}x{height}, "
                        f"larger than {MAX_SIDE}")
    if len(request.image_prompts) > MAX_IMAGE_PROMPTS:
        problems.append(f"{len(request.image_prompts)} image prompts: at most {MAX_IMAGE_PROMPTS}")
    lo, hi = IMAGE_PROMPT_STRENGTH_RANGE
    if not _finite(request.image_prompt_strength) or not lo <= request.image_prompt_strength <= hi:
        problems.append(f"image prompt strength {request.image_prompt_strength} must be between {lo:g} and {hi:g}")
    if not isinstance(request.preview_every, int) or not 0 <= request.preview_every <= MAX_STEPS:
        problems.append(f"preview every {request.preview_every!r} must be a whole number of steps from 0 (off) to "
                        f"{MAX_STEPS}")
    return problems


# --- the one constructor -----------------------------------------------------------------------------------------
# Flat field names, shared by the CLI (argparse dests), the server's JSON, SD.Next's mapping and `--from PNG`:
# every GenerationRequest field under its own name, and every StageSettings field as prior_<name> / decoder_<name>.
# The table is derived from the dataclasses, so a new field is accepted everywhere at once, never dropped.
STAGE_FIELDS = ("prior", "decoder")
ALIASES = {"denoise": "prior_denoise", "image_denoise": "prior_denoise", "negative": "negative_prompt", "batch": "batch_size", "steps": "prior_steps",
           "cfg": "prior_cfg"}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def request_field_names() -> tuple[str, ...]:
    """Every flat name `build_request` accepts (aliases excluded)."""
    top = [f.name for f in dataclasses.fields(GenerationRequest) if f.name not in STAGE_FIELDS]
    stage = [f"{s}_{f.name}" for s in STAGE_FIELDS for f in dataclasses.fields(StageSettings)]
    return tuple(top + stage)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a value against its field's type: ints are ints (not bools or 7.5), floats are finite numbers."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    kinds = [o for o in options if o is not type(None)]
    if kinds and kinds[0] in (int, float, str, bool):
        kind = kinds[0]
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise InvalidRequestError(f"{name} must be a finite number, got {value}")
                return float(value)
        elif isinstance(value, str):
            return value
        raise InvalidRequestError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
    return value


def build_request(fields: Mapping[str, Any] | None = None, /, **more: Any) -> GenerationRequest:
    """The one way to make a request from flat fields: unknown names are refused, types checked, sampler and
    scheduler names resolved (any spelling of cascade.names, "Default" = the model card's), then `validate`.

    Fields not given keep the model card's defaults. Raises InvalidRequestError with every problem.
    """
    from .names import UnknownNameError, resolve_sampler, resolve_scheduler

    given = {ALIASES.get(k, k): v for k, v in {**(fields or {}), **more}.items()}
    known = set(request_field_names())
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise InvalidRequestError(f"unknown request field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
    top_hints, stage_hints = _hints(GenerationRequest), _hints(StageSettings)
    top, stages = {}, {s: {} for s in STAGE_FIELDS}
    for key, value in given.items():
        stage = next((s for s in STAGE_FIELDS if key.startswith(s + "_") and key[len(s) + 1:] in stage_hints), None)
        if stage is None:
            top[key] = _coerce(key, value, top_hints[key])
            continue
        name = key[len(stage) + 1:]
        try:
            if name == "sampler":
                value = resolve_sampler(str(value), stage)
            elif name == "scheduler":
                value = resolve_scheduler(str(value), stage)
        except UnknownNameError as err:
            raise InvalidRequestError(f"{stage} {err}") from None
        stages[stage][name] = _coerce(key, value, stage_hints[name])
    defaults = {"prior": default_prior(), "decoder": default_decoder()}
    request = GenerationRequest(**top, **{s: replace(defaults[s], **stages[s]) for s in STAGE_FIELDS})
    validate(request)
    return request


def request_fields(request: GenerationRequest) -> dict[str, Any]:
    """The flat fields of a request (the inverse of `build_request`)."""
    out = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name not in STAGE_FIELDS}
    for stage in STAGE_FIELDS:
        settings = getattr(request, stage)
        out.update({f"{stage}_{f.name}": getattr(settings, f.name) for f in dataclasses.fields(settings)})
    return out


def with_fields(request: GenerationRequest, **fields: Any) -> GenerationRequest:
    """A copy of `request` with some flat fields changed, validated like any request."""
    return build_request({**request_fields(request), **fields})
