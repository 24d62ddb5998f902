"""Text -> Stage C -> Stage B -> Stage A, with our own sampling loop over diffusers' model classes.

Why our own loop: diffusers' Stable Cascade pipelines are deprecated (frozen at 0.35.2) and differ from ComfyUI and
the training code (no shift, Stage A scale 0.3764, timestep ratio rounded to the model dtype). This module follows
reference §3-4: CFG on the denoised prediction in fp32, the unconditional pass skipped at CFG 1.0, the r-embedding
in fp32 (see `models.unet`), Stage C latent 16 x H//c x W//c with clip_img zeros, Stage B conditioned on the
Stage C latent (zeros for the unconditional pass), Stage A decoding 0.43 x latent.

Seeds and noise (`request.noise`, cascade.sampling.StageNoise): "cpu" draws every image's noise on the CPU from
its own generator (seed + i), so one seed gives the same image on every device, and image i of a batch equals a
single run with seed + i; "comfyui" draws exactly what ComfyUI's KSampler draws for the seed (whole batch, its
ancestral / Brownian-tree noise on the device ComfyUI uses). Stage B uses `decoder_seed` when given (ComfyUI's
second KSampler), else the Stage C seed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import sampling
from .activations import stage_a_strips
from .errors import CascadeError, GenerationInterrupted
from .image_inputs import PriorImageInputs
from .request import GenerationRequest, StageSettings, validate

log = logging.getLogger(__name__)

# The components whose weights a phase's output depends on (where a NaN in its output can come from).
PHASE_INPUTS = {"prior": ("text_encoder", "prior"), "decoder": ("text_encoder", "decoder"), "vqgan": ("vqgan",)}


@dataclass
class StepEvent:
    """Reported after every sampling step; `latents` is the current denoised estimate (for live previews).

    `preview`: a PIL image of the first image's estimate on the steps `request.preview_every` asks for (else None);
    hosts with their own preview settings call `CascadePipeline.preview(event, method)` instead.
    """

    stage: str  # "prior" | "decoder"
    step: int  # 1-based
    total: int
    sigma: float
    latents: torch.Tensor
    preview: Any = None


@dataclass
class Conditioning:
    """CLIP-G text conditioning for a batch: hidden states before the final LayerNorm and the pooled embedding."""

    hidden: torch.Tensor  # (B, 77*k, hidden)
    pooled: torch.Tensor  # (B, 1, projection)

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning(self.hidden.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))


@dataclass
class GenerationResult:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1], on the CPU
    seeds: list[int]
    request: GenerationRequest
    dtypes: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Placement(Protocol):
    """Decides where components live in each phase (cascade.offload executes the memory plans)."""

    name: str

    def initial_device(self, component: str) -> torch.device: ...

    def pins_host_memory(self, component: str) -> bool: ...

    def enter(self, phase: str, components: dict[str, nn.Module]) -> None: ...

    def degrade(self, components: dict[str, nn.Module]) -> str | None:
        """After an out-of-memory error: switch one level down the plan ladder; the new mode, or None."""
        ...

    def recast(self, component: str, module: nn.Module, dtype: torch.dtype) -> None:
        """Convert a component's weights to `dtype` everywhere they live (NaN fallback to a safer dtype)."""
        ...


class Resident:
    """Everything is loaded onto the compute device and stays there (no plan, nothing to fall back to)."""

    name = "resident"

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def initial_device(self, component: str) -> torch.device:
        return self.device

    def pins_host_memory(self, component: str) -> bool:
        return False

    def enter(self, phase: str, components: dict[str, nn.Module]) -> None:
        return None

    def degrade(self, components: dict[str, nn.Module]) -> str | None:
        return None

    def recast(self, component: str, module: nn.Module, dtype: torch.dtype) -> None:
        module.to(dtype)


def cfg_denoiser(
    unet: nn.Module,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    cfg: float,
    rescale: float = 0.0,
    control: Callable[[float], list | None] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """denoiser(x, sigma) -> x0 in fp32: ComfyUI's EPS model call plus CFG (reference §4.4, §3.5).

    The sampler state x is in VE space; the model sees x / sqrt(sigma^2 + 1) in its own dtype and the unshifted
    timestep ratio r in fp32. Cond and uncond run as one batch when their shapes match, else as two calls; at
    CFG 1.0 (or without uncond) only the conditional pass runs. `control(sigma)` gives the ControlNet residuals
    for the step (cascade.controlnet.ControlSchedule), added in both passes as ComfyUI's ControlNetApplyAdvanced does.
    """
    dtype = next(unet.parameters()).dtype
    use_cfg = uncond is not None and cfg != 1.0
    batched = use_cfg and all(cond[k].shape == uncond[k].shape for k in cond)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond} if batched else None

    residuals: list = [None]

    def eps_of(x_in: torch.Tensor, r: torch.Tensor, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        if residuals[0] is not None:
            from .controlnet import expand

            kwargs = {**kwargs, "control": expand(residuals[0], x_in.shape[0])}
        return unet(x_in, r, **kwargs, return_dict=False)[0].float()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.float().reshape(-1)[:1].to(x.device)
        residuals[0] = control(float(sigma)) if control is not None else None
        x_in = (x / torch.sqrt(sigma**2 + 1)).to(dtype)
        r = sampling.timestep_from_sigma(sigma).to(x.device).float().expand(x.shape[0])
        if not use_cfg:
            eps = eps_of(x_in, r, cond)
        else:
            if batched:
                eps_c, eps_u = eps_of(torch.cat([x_in, x_in]), torch.cat([r, r]), both).chunk(2)
            else:
                eps_c, eps_u = eps_of(x_in, r, cond), eps_of(x_in, r, uncond)
            eps = eps_u + cfg * (eps_c - eps_u)
            if rescale > 0:
                eps = _rescale_cfg(eps, eps_c, rescale)
        return x - eps * sigma

    return denoise


class CascadePipeline:
    """Holds the loaded components and runs generations. Host-independent: no SD.Next, no printing."""

    def __init__(
        self,
        *,
        tokenizer,
        text_encoder: nn.Module,
        prior: nn.Module,
        decoder: nn.Module,
        stage_a: nn.Module,
        device: torch.device,
        placement: Placement | None = None,
        sources=None,
        backend=None,
        side_files=None,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.prior = prior
        self.decoder = decoder
        self.stage_a = stage_a
        self.device = torch.device(device)
        self.placement = placement or Resident(self.device)
        self.sources = sources
        self.backend = backend
        self.side_files = side_files  # cascade.side_parts.SideFiles: explicit encoder/previewer/CLIP vision files
        self._side = None
        self._empty: Conditioning | None = None

    @property
    def side(self):
        """The parts only some requests need (cascade.side_parts.SideParts), found and loaded on first use."""
        if self._side is None:
            from .side_parts import SideParts

            # On an accelerator a part is on the device only while used (what the memory planner counts).
            self._side = SideParts.for_pipeline(self.sources, self.side_files, self.device, self.backend)
        return self._side

    def require_parts(self, request: GenerationRequest) -> None:
        """Fail before any work when a request needs a part nobody has (headers only)."""
        from .side_parts import CLIP_VISION, EFFNET

        if request.image is not None:
            self.side.require(EFFNET)
        if request.image_prompts and request.image_prompt_strength != 0:
            self.side.require(CLIP_VISION)
        if request.controlnets:
            from .controlnet import require_parts

            require_parts(self, request)  # headers: each file a Stage C ControlNet fitting this prior

    @torch.inference_mode()
    def encode_image_inputs(self, request: GenerationRequest) -> PriorImageInputs:
        """Stage C's init latent and image-prompt conditioning (cascade.image_inputs); runs in whatever phase the
        placement is in (after text encoding: the text encoder's), each side part on the device only meanwhile."""
        from . import image_inputs
        from .side_parts import CLIP_VISION, EFFNET

        inputs = PriorImageInputs()
        if request.image is not None:
            with self.side.on_device(EFFNET) as encoder:
                inputs.init = image_inputs.stage_c_init_latent(encoder, request.image, request.width, request.height,
                                                               request.compression)
            expected = tuple(request.prior_latent_shape()[1:])
            if tuple(inputs.init.shape[1:]) != expected:
                raise CascadeError(f"the Stage C encoder gave a latent of {list(inputs.init.shape[1:])}, the prior "
                                   f"needs {list(expected)}: the encoder file does not fit this Stage C")
        if request.image_prompts and request.image_prompt_strength != 0:
            with self.side.on_device(CLIP_VISION) as vision:
                inputs.clip_img = image_inputs.clip_image_embeddings(vision, request.image_prompts,
                                                                     request.image_prompt_strength)
        return inputs

    def preview(self, event: StepEvent, method: str = "auto"):
        """A PIL preview of a step's estimate: Stage C through the previewer when one is found (else, and for
        Stage B, ComfyUI's latent-to-RGB factors); cascade.previews has the details."""
        from . import previews
        from .side_parts import PREVIEWER

        if event.stage == "prior" and method != "rgb" and self.side.has(PREVIEWER):
            with self.side.on_device(PREVIEWER) as previewer:
                return previews.preview_image(event.latents, event.stage, previewer, method)
        return previews.preview_image(event.latents, event.stage, None, "rgb" if method == "auto" else method)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "prior": self.prior, "decoder": self.decoder, "vqgan": self.stage_a}

    def _enter(self, phase: str) -> None:
        self.placement.enter(phase, self.components)

    def _nan_guarded(self, phase: str, fn: Callable[[], torch.Tensor], warnings: list[str]) -> torch.Tensor:
        """Run a UNet/VQGAN phase and check its output (prior latents, decoder latents, pixels) for NaN/inf.

        In fp16/bf16 a bad output re-runs the phase once in the backend's next safer dtype; in fp32 (or when the
        retry is bad too) it is a CascadeError naming the likely cause, never an image."""
        from cascade_backends.nan_guard import NonFiniteOutput, dtype_name, has_non_finite, run_with_dtype_fallback

        from .precision import explain_non_finite

        module = self.components[phase]
        dtype = next(module.parameters()).dtype
        feeds = {name: self.components[name] for name in PHASE_INPUTS.get(phase, (phase,))}
        if self.backend is None or dtype not in (torch.float16, torch.bfloat16):
            result = fn()
            if has_non_finite(result):
                raise CascadeError(explain_non_finite(phase, dtype, feeds))
            return result

        def run(target: torch.dtype) -> torch.Tensor:
            if next(module.parameters()).dtype != target:
                self.placement.recast(phase, module, target)
            return fn()

        try:
            result, _, reason = run_with_dtype_fallback(run, dtype, self.backend, stage=phase, warn=log.warning)
        except NonFiniteOutput:
            retried = dtype_name(next(module.parameters()).dtype)
            raise CascadeError(explain_non_finite(phase, dtype, feeds, retried if retried != dtype_name(dtype) else None)) from None
        if reason:
            warnings.append(reason)
        return result

    def _run_phase(self, phase: str, fn: Callable[[], object], warnings: list[str]):
        """Run a phase; on out-of-memory, fall one level down the memory plan and retry once."""
        if phase in ("prior", "decoder", "vqgan"):
            unguarded = fn
            fn = lambda: self._nan_guarded(phase, unguarded, warnings)  # noqa: E731
        try:
            return fn()
        except torch.OutOfMemoryError:
            pass  # leave the except block first: the failed attempt's frames (and its tensors) are freed with it
        gc.collect()
        previous = self.placement.name
        mode = self.placement.degrade(self.components)
        if mode is None:
            raise CascadeError(
                f"Out of memory in the {phase} phase with the {previous!r} memory plan, and no smaller plan is left. "
                "Lower the size or the batch, or use a lite model."
            )
        message = f"out of memory in the {phase} phase with the {previous!r} plan; retried with the {mode!r} plan"
        log.warning(message)
        warnings.append(message)
        try:
            return fn()
        except torch.OutOfMemoryError:
            pass
        gc.collect()
        raise CascadeError(
            f"Out of memory in the {phase} phase even with the {mode!r} memory plan. Lower the size or the batch, "
            "or close other programs using the GPU. Nothing was written; the next generation can run."
        )

    # --- text ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, prompts: list[str], syntax: str = "a1111") -> Conditioning:
        """CLIP-G conditioning for each prompt (weights, long prompts and BREAK handled by cascade.text), the weights
        read in `syntax` (cascade.prompts.SYNTAXES)."""
        from .text import encode_prompts

        self._enter("text_encoder")
        hidden, pooled = encode_prompts(self.text_encoder, self.tokenizer, prompts, syntax=syntax)
        return Conditioning(hidden.float(), pooled.float())

    def _sample_stage(
        self,
        stage: str,
        denoiser,
        settings: StageSettings,
        shape: tuple[int, ...],
        seeds: list[int],
        callback: Callable[[StepEvent], None] | None,
        interrupt: Callable[[], bool] | None,
        init: torch.Tensor | None = None,
        preview: Callable[[torch.Tensor], Any] | None = None,
        preview_every: int = 0,
        noise: str = "cpu",
    ) -> torch.Tensor:
        """Sample one stage from noise, or from `init` (img2img: ComfyUI EPS.noise_scaling, noise * sigma0 + latent,
        on the KSampler sigmas for the stage's denoise). `preview(denoised)` makes StepEvent.preview when due.

        `seeds` are the images' seeds (seed + i); `noise` the mode (cascade.sampling.StageNoise): "cpu" gives image
        i its own CPU generator for its initial and sampler noise, "comfyui" seeds the batch with seeds[0] as
        ComfyUI's KSampler does, its sampler noise drawn on this pipeline's device (ComfyUI's load device).
        """
        from .previews import every

        sigmas = sampling.sigmas_for(settings.sampler, settings.scheduler, settings.steps, settings.shift, settings.denoise)
        source = sampling.StageNoise(noise, seeds[0], len(seeds))
        x = source.initial(shape, self.device) * sampling.initial_noise_scale(sigmas)
        if init is not None:
            x = x + init.to(x.device, x.dtype).expand_as(x)
        total = len(sigmas) - 1
        due = every(preview_every if preview is not None else 0)

        def on_step(step: int, total_: int, sigma: torch.Tensor, x_: torch.Tensor, denoised: torch.Tensor) -> None:
            if callback is not None:
                image = preview(denoised) if due(step + 1, total_) else None
                callback(StepEvent(stage, step + 1, total_, float(sigma), denoised, image))
            if interrupt is not None and interrupt():
                raise GenerationInterrupted(f"interrupted during the {stage} stage at step {step + 1}/{total_}")

        if interrupt is not None and interrupt():
            raise GenerationInterrupted(f"interrupted before the {stage} stage")
        log.debug("%s: %d steps, sigmas %s", stage, total, [round(float(s), 4) for s in sigmas[:4]])
        return sampling.sample(settings.sampler, denoiser, x, sigmas, callback=on_step,
                               noise_sampler=source.sampler(settings.sampler, x, sigmas))

    # --- stages -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_prior(
        self,
        request: GenerationRequest,
        cond: Conditioning,
        uncond: Conditioning,
        callback: Callable[[StepEvent], None] | None = None,
        interrupt: Callable[[], bool] | None = None,
        images: PriorImageInputs | None = None,
    ) -> torch.Tensor:
        """Stage C: the 16-channel image embedding (B, 16, H//c, W//c), fp32.

        `images` (from `encode_image_inputs`; computed here when not given) holds the img2img init latent and the
        image-prompt `clip_img` for the conditional pass; the unconditional pass keeps zeros (ComfyUI unCLIP).
        """
        from .image_inputs import zero_clip_img

        if images is None:
            images = self.encode_image_inputs(request) if request.image is not None or request.image_prompts else None
        self._enter("prior")
        dtype = next(self.prior.parameters()).dtype
        shape = request.prior_latent_shape()
        img_dim = self.prior.config.clip_image_in_channels
        clip_img = zero_clip_img(shape[0], img_dim, self.device, dtype)
        cond_img = clip_img
        if images is not None and images.clip_img is not None:
            if images.clip_img.shape[-1] != img_dim:
                raise CascadeError(f"the CLIP vision encoder gives {images.clip_img.shape[-1]}-wide embeddings, the "
                                   f"prior takes {img_dim}: use the CLIP-L vision model (ViT-L/14) for image prompts")
            cond_img = images.clip_img.to(self.device, dtype).repeat(shape[0], 1, 1)

        def kwargs(c: Conditioning, img: torch.Tensor) -> dict[str, torch.Tensor]:
            return {
                "clip_text": c.hidden.to(self.device, dtype),
                "clip_text_pooled": c.pooled.to(self.device, dtype),
                "clip_img": img,
            }

        cond_kw, uncond_kw = kwargs(cond, cond_img), kwargs(uncond, clip_img)
        if request.prior.cfg != 1.0:
            from .text import match_sequence_lengths

            matched = match_sequence_lengths(cond_kw["clip_text"], uncond_kw["clip_text"])
            if matched is not None:
                cond_kw["clip_text"], uncond_kw["clip_text"] = matched
        control = None
        if request.controlnets:
            from .controlnet import schedule_for

            control = schedule_for(self, request)
        denoiser = cfg_denoiser(self.prior, cond_kw, uncond_kw, request.prior.cfg, request.cfg_rescale, control)
        init = images.init if images is not None else None
        with contextlib.ExitStack() as stack:
            make = None
            if request.preview_every > 0 and callback is not None:  # the previewer is on the device only meanwhile
                from . import previews
                from .side_parts import PREVIEWER

                previewer = stack.enter_context(self.side.on_device(PREVIEWER)) if self.side.has(PREVIEWER) else None
                make = lambda d: previews.preview_image(d, "prior", previewer)  # noqa: E731
            return self._sample_stage("prior", denoiser, request.prior, shape, request.seeds, callback, interrupt,
                                      init, make, request.preview_every, noise=request.noise)

    @torch.inference_mode()
    def run_decoder(
        self,
        request: GenerationRequest,
        prior_latents: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning,
        callback: Callable[[StepEvent], None] | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Stage B: the 4-channel Stage A latent (B, 4, H/4, W/4) of the output size (`upscale` x), model space, fp32.

        With `decoder_image`, sampling starts from its Stage A encoding (cascade.image_inputs.stage_b_init_latent).
        """
        self._enter("decoder")
        dtype = next(self.decoder.parameters()).dtype
        shape = request.decoder_latent_shape()
        # Resize the effnet conditioning to the UNet's first level in fp32 ourselves (the original code does it in
        # fp32; diffusers would interpolate in the model dtype). The model's own resize is then an exact identity.
        grid = (shape[2] // self.decoder.config.patch_size, shape[3] // self.decoder.config.patch_size)
        effnet = F.interpolate(prior_latents.float(), size=grid, mode="bilinear", align_corners=True)
        effnet = effnet.to(self.device, dtype)
        cond_kw = {"clip_text_pooled": cond.pooled.to(self.device, dtype), "effnet": effnet}
        uncond_kw = {"clip_text_pooled": uncond.pooled.to(self.device, dtype), "effnet": torch.zeros_like(effnet)}
        denoiser = cfg_denoiser(self.decoder, cond_kw, uncond_kw, request.decoder.cfg)
        init = None
        if request.decoder_image is not None:
            from .image_inputs import stage_b_init_latent

            width, height = request.output_size
            init = stage_b_init_latent(self.stage_a, request.decoder_image, width, height, request.stage_a_scale,
                                       overlap=8)
        make = None
        if request.preview_every > 0 and callback is not None:
            from . import previews

            make = lambda d: previews.preview_image(d, "decoder")  # noqa: E731
        return self._sample_stage("decoder", denoiser, request.decoder, shape, request.decoder_seeds, callback,
                                  interrupt, init, make, request.preview_every, noise=request.noise)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, scale: float) -> torch.Tensor:
        """Stage A: pixels in [0, 1], (B, 3, H, W) fp32 on the CPU."""
        self._enter("vqgan")
        dtype = next(self.stage_a.parameters()).dtype
        overlap = stage_a_overlap(self.stage_a.config)
        images = []
        for latent in latents.split(1):  # one image at a time, in strips: Stage A's activations dominate at large sizes
            image = decode_in_strips(self.stage_a, (latent * scale).to(self.device, dtype), overlap)
            images.append(image.float().clamp(0, 1).cpu())
        return torch.cat(images)

    # --- the whole thing ----------------------------------------------------------------------------------
    def generate(
        self,
        request: GenerationRequest,
        *,
        callback: Callable[[StepEvent], None] | None = None,
        interrupt: Callable[[], bool] | None = None,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
    ) -> GenerationResult:
        """Run one request end to end. `cond`/`uncond` let a host pass its own prompt encodings (one per prompt).

        `request.loras` are merged for this request and the original weights restored after it, also on error or
        interrupt (cascade.lora_apply); a LoRA that does not fit is refused before any weight changes."""
        from .lora_apply import applied

        validate(request)
        request = request.with_seed()
        self.require_parts(request)
        with applied(self, request.loras) as loras:
            result = self._generate(request, callback, interrupt, cond, uncond)
        if loras is not None:
            result.timings["lora_merge"] = loras.seconds
        return result

    def _generate(self, request: GenerationRequest, callback, interrupt, cond: Conditioning | None,
                  uncond: Conditioning | None) -> GenerationResult:
        timings: dict[str, float] = {}
        warnings: list[str] = []
        t0 = time.perf_counter()
        syntax = request.prompt_syntax
        if cond is None:
            cond = self._run_phase("text_encoder", lambda: self.encode([request.prompt], syntax), warnings)
        if uncond is None:
            uncond = self._run_phase("text_encoder", lambda: self.encode([request.negative_prompt], syntax), warnings)
        batch = request.batch_size
        cond = cond if cond.hidden.shape[0] == batch else cond.repeat(batch // cond.hidden.shape[0])
        uncond = uncond if uncond.hidden.shape[0] == batch else uncond.repeat(batch // uncond.hidden.shape[0])
        timings["text"] = time.perf_counter() - t0

        images = PriorImageInputs()
        if request.image is not None or request.image_prompts:
            t0 = time.perf_counter()
            images = self._run_phase("text_encoder", lambda: self.encode_image_inputs(request), warnings)
            timings["image_inputs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prior_latents = self._run_phase(
            "prior", lambda: self.run_prior(request, cond, uncond, callback, interrupt, images), warnings)
        timings["prior"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents = self._run_phase(
            "decoder", lambda: self.run_decoder(request, prior_latents, cond, uncond, callback, interrupt), warnings
        )
        timings["decoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = self._run_phase("vqgan", lambda: self.decode(latents, request.stage_a_scale), warnings)
        timings["vqgan"] = time.perf_counter() - t0
        dtypes = {name: str(next(m.parameters()).dtype).removeprefix("torch.") for name, m in self.components.items()}
        return GenerationResult(images, request.seeds, request, dtypes, timings, warnings)


def stage_a_overlap(config) -> int:
    """Latent rows of context a strip needs on each side: Stage A's decoder sees one more row per residual block
    (depthwise 3x3) at latent resolution, plus the transposed convolution and the last block at 2x; rounded up."""
    return int(config.bottleneck_blocks) + 4


def decode_in_strips(stage_a: nn.Module, latent: torch.Tensor, overlap: int) -> torch.Tensor:
    """Stage A decode of one latent (1, 4, h, w), strip by strip; the same pixels as one decode, less memory.

    Exact because every output row depends only on latents within `overlap` rows (a convolutional decoder with
    no global statistics); the rows a strip decodes from padded edges are cropped away.
    """
    strips = stage_a_strips(latent.shape[2], latent.shape[3], overlap)
    pieces = []
    for read_lo, read_hi, keep_lo, keep_hi in strips:
        out = stage_a.decode(latent[:, :, read_lo:read_hi], return_dict=False)[0]
        scale = out.shape[2] // (read_hi - read_lo)
        pieces.append(out[:, :, scale * (keep_lo - read_lo) : scale * (keep_hi - read_lo)])
    return torch.cat(pieces, dim=2)


def _rescale_cfg(eps: torch.Tensor, eps_cond: torch.Tensor, rho: float) -> torch.Tensor:
    """The original code's CFG rescale (cfg_rho, 0.7 there): match the guided prediction's std to the conditional one.

    Applied per image on the epsilon prediction, the model's raw output, as Stable Cascade's gdf does.
    """
    dims = tuple(range(1, eps.ndim))
    ratio = eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return rho * eps * ratio + (1 - rho) * eps


def to_uint8(images: torch.Tensor):
    """(B, 3, H, W) floats -> (B, H, W, 3) uint8 numpy, ComfyUI's conversion (nodes.py SaveImage:
    ``np.clip(255. * image, 0, 255).astype(np.uint8)``, i.e. truncation in float32, not rounding), so the CLI,
    SD.Next and ComfyUI write the same pixels for the same floats."""
    import numpy as np

    arr = images.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    return np.clip(255.0 * arr, 0, 255).astype(np.uint8)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL images, through `to_uint8` (ComfyUI's truncation)."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]
