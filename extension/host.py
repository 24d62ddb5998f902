"""SD.Next as the pipeline's host: per-request arguments, infotext, progress, interrupt/skip/pause.

Progress: SD.Next's own `diffusers_callback` is removed from the call arguments. It only reaches the prior (SD.Next
gives the decoder no callback), it sizes the bar from `pipe.num_timesteps`, and it reports an interrupt by raising
`AssertionError`, which SD.Next logs and turns into an empty result. Instead the bar is set to prior + decoder
steps at the start and advanced after every step of both stages; `interrupted`, `skipped` and `paused` are
checked between steps.

img2img: SD.Next never passes `image`/`strength` to a pipeline whose class its task switch does not know (ours stays a
text-to-image task), so `preprocess` hands over `p.init_images` (already flattened onto the background colour and
resized by the chosen resize mode) and `p.denoising_strength`; the engine then fits the image to the request size
with ComfyUI's centre crop. A hires pass passes its images itself.

Live previews: SD.Next's preview for Stable Cascade decodes a Stage C latent with a previewer it downloads, and
would show Stage B latents as noise. Instead each due step gets our own preview (the previewer part of the main
file, else ComfyUI's latent-to-RGB factors; cascade.previews), placed in `shared.state.current_image` the way
SD.Next's callback does for pipelines that give images. SD.Next's settings decide: "Live preview method"
(`show_progress_type`: None = no previews, Simple = the factors, anything else = the previewer when there is one)
and "Progress update period" (`live_preview_refresh_period`, ms: at most one preview per period).

Stop semantics: Interrupt ends the run and returns what finished — nothing, as a batch runs as one — and SD.Next
then ends the job. Skip ends the current batch, consumes the skip flag and lets SD.Next go on with the next batch
(with the flag left set, SD.Next would also drop the batch after it).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from cascade.api_fields import sdnext_cfg
from cascade.pipeline import StepEvent
from cascade.request import default_decoder, default_prior

from . import controlnet, params
from .errors import CascadeHostError, host_error
from .pipeline import DEFAULT_STRENGTH, PipelineHost

STAGE_TITLES = {"prior": "Stage C (prior)", "decoder": "Stage B (decoder)"}
# SD.Next's "Live preview method" -> cascade.previews method (TAESD and Full have no Stable Cascade counterpart that
# is cheap enough per step; they get the previewer, the closest to a decode).
PREVIEW_METHODS = {"None": None, "Simple": "rgb", "Approximate": "auto", "TAESD": "auto", "Full": "auto",
                   "Full VAE": "auto"}
DEFAULT_REFRESH_MS = 500  # SD.Next's live_preview_refresh_period default
_SDNEXT_CALLBACKS = ("prior_callback_on_step_end", "prior_callback_on_step_end_tensor_inputs", "prior_callback_steps",
                     "callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback_steps", "callback")


def request_value(p: Any, key: str) -> Any:
    """A per-request value: `extra: {key: value}` (an attribute of p), else the option (override_settings apply to
    opts while the request runs), else None."""
    from modules import shared

    value = getattr(p, key, None)
    if value is None:
        value = shared.opts.data.get(key)
    return value


def _report_seeds(p: Any, seeds: list[int]) -> None:
    """Write the seeds used back into p (this batch's slice of all_seeds), where SD.Next's infotext and response
    read them (modules/processing_info.py create_infotext, Processed.all_seeds)."""
    p.seeds = list(seeds)
    all_seeds = getattr(p, "all_seeds", None)
    if isinstance(all_seeds, list):
        start = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", len(seeds)) or len(seeds))
        all_seeds[start:start + len(seeds)] = seeds


class SdnextHost(PipelineHost):
    """Binds one loaded pipeline to SD.Next's request objects and `shared.state`."""

    def __init__(self, decoder_name: str, offload_mode: str = "none", clock=time.monotonic):
        self.decoder_name = decoder_name
        self.offload_mode = offload_mode
        self.clock = clock
        self._last_preview: float | None = None

    # --- arguments and infotext -------------------------------------------------------------------------------
    def preprocess(self, pipe, p: Any, args: dict[str, Any]) -> None:
        try:
            self._preprocess(p, args)
        except Exception as e:
            raise host_error(e, "request") from e

    def _check_offload_mode(self) -> None:
        """Who places the weights is decided at load time (offload.py); a switch to or from `none` needs a reload."""
        from modules import shared

        mode = shared.opts.diffusers_offload_mode
        if mode != self.offload_mode and "none" in (mode, self.offload_mode):
            raise CascadeHostError(
                f"SD.Next's model offload mode changed from {self.offload_mode!r} to {mode!r} after this Stable Cascade "
                "model was loaded. Reload the model to apply it: select it again after unloading, or POST "
                "/sdapi/v1/reload-checkpoint?force=true.", 409)

    def _preprocess(self, p: Any, args: dict[str, Any]) -> None:
        self._check_offload_mode()
        settings = params.resolve_settings(lambda key: request_value(p, key))
        params.check_requested_size(args.get("width", getattr(p, "width", None)),
                                    args.get("height", getattr(p, "height", None)),
                                    getattr(p, params.REQUESTED_SIZE_ATTR, None))
        # SD.Next passes a CFG only when it is > -1; read p's field otherwise, so -1 means the default and -5 is refused.
        prior_cfg = sdnext_cfg(args.get("prior_guidance_scale", getattr(p, "cfg_scale", None)),
                                      default_prior().cfg, "CFG scale (cfg_scale)")
        decoder_cfg = sdnext_cfg(args.get("decoder_guidance_scale", getattr(p, "cfg_image", None)),
                                        default_decoder().cfg, "decoder CFG (cfg_image, 'Refine guidance')")
        prior = params.prior_stage(args.get("prior_num_inference_steps", p.steps), prior_cfg, p.sampler_name, settings)
        decoder = params.decoder_stage(args.get("num_inference_steps", p.refiner_steps), decoder_cfg, settings)
        args.update(
            prior_sampler=prior.sampler, prior_scheduler=prior.scheduler, prior_shift=prior.shift,
            prior_guidance_scale=prior.cfg,
            decoder_sampler=decoder.sampler, decoder_scheduler=decoder.scheduler, decoder_shift=decoder.shift,
            decoder_guidance_scale=decoder.cfg, compression=settings.compression, stage_a_scale=settings.stage_a_scale,
        )
        fields = {**(args.get("cascade_fields") or {}), "noise": settings.noise}
        upscale = params.hires_upscale(getattr(p, "enable_hr", False), getattr(p, "hr_scale", 2.0),
                                       getattr(p, "hr_resize_x", 0), getattr(p, "hr_resize_y", 0),
                                       args.get("width") or getattr(p, "width", 1024),
                                       args.get("height") or getattr(p, "height", 1024))
        if upscale != 1:
            fields["upscale"] = upscale
            p.enable_hr = False  # Stage B renders the larger image: SD.Next's second (img2img) pass must not run too
        image_prompts = params.decode_image_prompts(request_value(p, params.IMAGE_PROMPTS_KEY))
        if image_prompts:
            fields["image_prompts"] = image_prompts
            strength = request_value(p, params.IMAGE_PROMPT_STRENGTH_KEY)
            if strength not in (None, ""):
                fields["image_prompt_strength"] = params.number(strength, params.IMAGE_PROMPT_STRENGTH_KEY)
        controlnets = controlnet.sdnext_entries(request_value(p, controlnet.EXTRA_KEY))
        if controlnets:
            fields["controlnets"] = controlnets
        args["cascade_fields"] = fields
        p.cfg_scale = prior.cfg  # the response's info reports the CFG used, not the UI's -1
        if getattr(p, "seeds", None):
            args["seeds"] = params.resolve_seeds(p.seeds)
            _report_seeds(p, args["seeds"])
        for key in _SDNEXT_CALLBACKS:
            args.pop(key, None)
        init_images = getattr(p, "init_images", None)
        if init_images and args.get("image") is None:  # the img2img tab (see the module doc)
            args["image"] = list(init_images)
            args["strength"] = getattr(p, "denoising_strength", None)
        # The engine encodes the prompt text itself (README, "SD.Next"); SD.Next passes embeddings instead of text when
        # its parser ran, so hand over this batch's text too.
        args.setdefault("prompt", list(p.prompts))
        args.setdefault("negative_prompt", list(p.negative_prompts))
        if args.get("image") is not None:  # SD.Next writes "Denoising strength" only for its own img2img task types
            strength = args.get("strength")
            prior = replace(prior, denoise=float(DEFAULT_STRENGTH if strength is None else strength))
        p.extra_generation_params.update(params.infotext_fields(prior, decoder, settings, self.decoder_name))
        p.extra_generation_params["Noise"] = settings.noise  # as the CLI writes it (`--from` reads it back)
        if upscale != 1:
            p.extra_generation_params["Upscale"] = upscale
        if image_prompts:
            p.extra_generation_params["Image prompts"] = len(image_prompts)
            p.extra_generation_params["Image prompt strength"] = fields.get("image_prompt_strength", 1.0)
        if controlnets:
            p.extra_generation_params["ControlNet"] = controlnet.infotext(controlnets)

    # --- progress and stopping ----------------------------------------------------------------------------------
    def begin(self, total_steps: int) -> None:
        from modules import shared

        shared.state.sampling_steps = total_steps
        shared.state.sampling_step = 0
        self._last_preview = None

    def preview_method(self, event: StepEvent) -> str | None:
        """SD.Next's preview settings for this step (module doc): the method, or None when no preview is due."""
        from modules import shared

        opts, state = shared.opts, shared.state
        if getattr(state, "disable_preview", False):
            return None
        name = str(getattr(opts, "show_progress_type", "TAESD"))
        method = PREVIEW_METHODS.get(name, "auto")
        if method is None:
            return None
        period = getattr(opts, "live_preview_refresh_period", DEFAULT_REFRESH_MS)
        period = DEFAULT_REFRESH_MS if not isinstance(period, (int, float)) else max(0.0, float(period))
        now = self.clock()
        if self._last_preview is not None and (now - self._last_preview) * 1000 < period:
            return None
        self._last_preview = now
        return method

    def step(self, event: StepEvent) -> None:
        from modules import shared

        if event.preview is not None:  # as SD.Next's diffusers_callback does for an `image` callback input
            shared.state.current_image = event.preview
            shared.state.current_latent = None
            shared.state.preview_job = -1
        shared.state.step()
        shared.state.textinfo = f"Stable Cascade {STAGE_TITLES.get(event.stage, event.stage)}: step {event.step}/{event.total}"

    def should_stop(self) -> bool:
        from modules import shared

        state = shared.state
        while state.paused and not (state.interrupted or state.skipped):
            time.sleep(0.1)
        return bool(state.interrupted or state.skipped)

    def stopped(self) -> None:
        from modules import shared

        if shared.state.skipped and not shared.state.interrupted:
            shared.state.skipped = False


# --- the device SD.Next chose ---------------------------------------------------------------------------------------
# SD.Next's backend names (`modules.devices.backend`, from its launcher's --use-* flags) -> the device layer's names.
# DirectML is not supported: torch-directml is end-of-life.
SDNEXT_BACKENDS = {"ipex": "xpu", "xpu": "xpu", "cuda": "cuda", "zluda": "cuda", "rocm": "rocm", "mps": "mps",
                   "cpu": "cpu", "openvino": "openvino"}


def sdnext_backend(devices: Any, **kwargs: Any):
    """The engine's Backend for the device SD.Next chose (`modules.devices`: `.device` and `.backend`), built from
    that choice without probing torch.cuda (SD.Next aliases it to torch.xpu on Intel Arc). `kwargs` go to
    `cascade_backends.backend_from_torch_device` (ov_device, and the stand-ins tests pass)."""
    from cascade_backends import BackendUnavailable, backend_from_torch_device

    given = getattr(devices, "backend", None)
    name = None
    if given is not None:
        key = str(given).lower()
        if key == "directml":
            raise BackendUnavailable("SD.Next's DirectML backend is not supported (torch-directml is end-of-life); "
                                     "use ROCm/ZLUDA on AMD, or OpenVINO/XPU on Intel")
        if key not in SDNEXT_BACKENDS:
            raise BackendUnavailable(f"unknown SD.Next backend {given!r}; supported: {', '.join(SDNEXT_BACKENDS)}")
        name = SDNEXT_BACKENDS[key]
    backend = backend_from_torch_device(devices.device, backend_name=name, **kwargs)
    if given is not None:
        backend.reasons.insert(1, f"SD.Next backend {given!r} is the device layer's {name!r}")
    return backend
