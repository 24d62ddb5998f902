"""What one generation asks for, validated before anything runs.

Defaults are the SoteDiffusion / Stable Cascade model card's (reference §4.7): prior DDPM on SGM Uniform, 30
steps, CFG 7, shift 2; decoder Euler a on Karras, 10 steps, CFG 1.0, shift 1; compression 42; sizes in
multiples of 128. Sizes that are not multiples of 128 are rejected with the nearest valid sizes in the message
rather than silently rounded, so the image you get is always the size you asked for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from .errors import InvalidRequestError

SIZE_MULTIPLE = 128
MAX_SIDE = 4096
COMPRESSION_RANGE = (16.0, 128.0)
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
    """One txt2img call. `seed=-1` draws a random seed; image i of the batch uses seed + i."""

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

    def with_seed(self) -> "GenerationRequest":
        """The same request with a concrete seed (a random one when seed is -1)."""
        if self.seed >= 0:
            return self
        return replace(self, seed=random.randrange(0, 2**32 - 1))

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.batch_size)]

    def prior_latent_shape(self) -> tuple[int, int, int, int]:
        """Stage C latent (B, 16, H//c, W//c), ComfyUI's StableCascade_EmptyLatentImage rule."""
        c = self.compression
        return (self.batch_size, 16, int(self.height // c), int(self.width // c))

    def decoder_latent_shape(self) -> tuple[int, int, int, int]:
        """Stage B latent (B, 4, H/4, W/4)."""
        return (self.batch_size, 4, self.height // 4, self.width // 4)


def _nearest(value: int) -> str:
    lo = max(SIZE_MULTIPLE, (value // SIZE_MULTIPLE) * SIZE_MULTIPLE)
    hi = lo + SIZE_MULTIPLE if lo < value else lo
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def validate(request: GenerationRequest) -> None:
    """Raise InvalidRequestError naming every problem and the fix."""
    problems = []
    for name, value in (("width", request.width), ("height", request.height)):
        if value % SIZE_MULTIPLE or value < SIZE_MULTIPLE:
            problems.append(f"{name} {value} is not a multiple of {SIZE_MULTIPLE} (nearest valid: {_nearest(value)})")
        elif value > MAX_SIDE:
            problems.append(f"{name} {value} is larger than {MAX_SIDE}")
    lo, hi = COMPRESSION_RANGE
    if not lo <= request.compression <= hi:
        problems.append(f"compression {request.compression} is outside {lo:g}-{hi:g} (the model card uses 42, 32-64)")
    elif min(request.prior_latent_shape()[2:]) < 1:
        problems.append(f"compression {request.compression} leaves no Stage C latent at {request.width}x{request.height}")
    if request.batch_size < 1:
        problems.append(f"batch size {request.batch_size} must be at least 1")
    if not 0 <= request.cfg_rescale <= 1:
        problems.append(f"cfg rescale {request.cfg_rescale} must be between 0 and 1")
    for stage_name, stage in (("prior", request.prior), ("decoder", request.decoder)):
        if stage.steps < 1:
            problems.append(f"{stage_name} steps {stage.steps} must be at least 1")
        if stage.cfg < 0:
            problems.append(f"{stage_name} CFG {stage.cfg} must not be negative")
        if stage.shift <= 0:
            problems.append(f"{stage_name} shift {stage.shift} must be positive")
        if not 0 < stage.denoise <= 1:
            problems.append(f"{stage_name} denoise {stage.denoise} must be in (0, 1]")
    if problems:
        raise InvalidRequestError("Invalid request: " + "; ".join(problems) + ".")
