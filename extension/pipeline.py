"""The pipeline object SD.Next drives: a diffusers-shaped front for our engine (`cascade.pipeline.CascadePipeline`).

Why this shape (reference/sdnext.md §2.6, §3.5): SD.Next recognises Stable Cascade by the class name
("StableCascade" -> prompt/step/CFG mapping, model type `sc`), walks `prior_pipe`/`decoder_pipe` and registered
modules for offload, quantisation and moves, fills only *named* `__call__` parameters, and asks for
`output_type='np'` because the model has a `vqgan` and no `vae`. Subclassing diffusers'
`StableCascadeCombinedPipeline` (same `__init__`, so `components`/`device` stay consistent) gives all of that;
`__call__` is ours and runs the engine.

Prompt conditioning: the engine re-encodes the prompt *text* with `cascade.text` (the model card's / ComfyUI's
encoding: last CLIP-G layer before the final LayerNorm, ComfyUI weighting, pooled embedding of the weight-free
text, 75-token chunks, BREAK). Embeddings passed in (`prompt_embeds` plus either pooled name) are used only when no
text is given. See the README (section "SD.Next") for why SD.Next's own embeddings are not used.

Stopping: when the host asks to stop, the images finished so far are returned (`interrupted=True`) — usually none,
as a batch runs as one. Every other failure is raised as `extension.errors.CascadeHostError`, so a failed
generation reaches the user as an error and never as a success without images.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch
from diffusers import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline
from diffusers.utils import BaseOutput

from cascade import sampling
from cascade.errors import GenerationInterrupted, InvalidRequestError
from cascade.lora import LoraError
from cascade.pipeline import CascadePipeline, Conditioning, StepEvent, to_pil
from cascade.request import STAGE_A_SCALE, build_request, default_decoder, default_prior

from .errors import CascadeHostError, host_error
from .lora import LoraAdapters

log = logging.getLogger(__name__)


class PipelineHost:
    """What the pipeline asks of its host (SD.Next: extension.host.SdnextHost). This base does nothing."""

    def preprocess(self, pipe: "StableCascadeSingleFilePipeline", p: Any, args: dict[str, Any]) -> None:
        """Complete the call arguments from the host's request object before the call."""

    def begin(self, total_steps: int) -> None:
        """A generation of `total_steps` sampling steps (both stages, all images) starts."""

    def preview_method(self, event: StepEvent) -> str | None:
        """Whether this step gets a live preview, and how (cascade.previews.METHODS); None = no preview."""
        return None

    def step(self, event: StepEvent) -> None:
        """One sampling step of either stage finished (`event.preview` holds the preview `preview_method` asked for)."""

    def should_stop(self) -> bool:
        """Checked after every step: True stops the generation between steps."""
        return False

    def stopped(self) -> None:
        """The generation stopped because `should_stop` said so."""


@dataclass
class CascadePipelineOutput(BaseOutput):
    images: Any  # np (B, H, W, 3) float32 in [0, 1] | list of PIL | torch (B, 3, H, W)
    seeds: list[int] | None = None
    interrupted: bool = False


def _as_list(value: str | list[str] | None, n: int | None = None) -> list[str]:
    if value is None:
        items = [""]
    elif isinstance(value, str):
        items = [value]
    else:
        items = [v if v is not None else "" for v in value]
    if n is not None and len(items) == 1 and n > 1:
        items = items * n
    return items


def _pooled(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Any pooled layout -> (B, 1, P): diffusers' (B, 1, P), SD.Next's (B, P) and its (1, B, P) `unsqueeze(0)`."""
    if t.ndim == 2:
        return t.unsqueeze(1)
    if t.ndim == 3 and t.shape[0] == 1 and t.shape[1] == batch and batch > 1:
        return t.transpose(0, 1)
    if t.ndim == 3:
        return t
    raise InvalidRequestError(f"pooled text embeddings of shape {tuple(t.shape)} are not (B, P) or (B, 1, P)")


def _seed_list(seeds: list[int] | None, generator, batch: int) -> list[int]:
    """Per-image seeds: explicit seeds, else each generator's seed (SD.Next seeds one per image), else random."""
    if seeds:
        out = [int(s) for s in seeds]
    elif generator is not None:
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        out = [int(g.initial_seed()) for g in gens]
    else:
        out = [random.randrange(0, 2**32 - 1)]
    while len(out) < batch:
        out.append(out[-1] + 1)
    return out[:batch]


@contextlib.contextmanager
def _quiet_deprecation():
    """diffusers warns that every StableCascade* pipeline class is deprecated; ours is not diffusers' pipeline."""
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _consecutive_runs(seeds: list[int], lengths: list[tuple[int, ...]] | None = None) -> list[tuple[int, int]]:
    """Index ranges [start, end) of seeds that go up by one: each runs as one engine batch (seed + i).

    `lengths` (per image, e.g. the cond/uncond sequence lengths) also splits a run where it changes: images in one
    batch must have conditionings of one length, else they would be tiled to a common length (which changes the
    result, Stage C attends over image and text tokens together) and image i would differ from a single run.
    """
    runs, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1 or (lengths is not None and lengths[i] != lengths[i - 1]):
            runs.append((start, i))
            start = i
    return runs


DEFAULT_STRENGTH = 0.8  # diffusers' img2img pipelines' default `strength`, for callers that pass an image alone


def _to_pil(image: Any, what: str):
    """A PIL image from what diffusers-style callers pass: PIL, or an HWC / CHW array or tensor (uint8, or floats in
    [0, 1]); cascade.images then checks it like any input."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise InvalidRequestError(f"{what} array of shape {tuple(image.shape)} is not one HWC or CHW image")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    raise InvalidRequestError(f"{what} must be a PIL image, an array or a tensor, got {type(image).__name__}")


def _init_images(image: Any, batch: int) -> list | None:
    """One init image per output image from `image` (diffusers' img2img argument): one image for the whole batch,
    or a list with one per image (SD.Next passes `p.init_images`; its hires pass passes each first-pass image)."""
    if image is None:
        return None
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        items = list(image)
    items = [_to_pil(item, f"init image {i + 1}") for i, item in enumerate(items) if item is not None]
    if not items:
        return None
    if len(items) == 1:
        return items * batch
    if len(items) != batch:
        raise InvalidRequestError(f"{len(items)} init images for {batch} images: pass one image, or one per image")
    return items


def _image_keys(inits: list | None) -> list[int]:
    """Per image, which distinct init image it starts from (runs of one engine batch share one init image)."""
    if inits is None:
        return []
    seen: list = []
    keys = []
    for image in inits:
        match = next((i for i, other in enumerate(seen) if other is image or (
            other.size == image.size and other.mode == image.mode and other.tobytes() == image.tobytes())), None)
        if match is None:
            seen.append(image)
            match = len(seen) - 1
        keys.append(match)
    return keys


def _rows(cond: list[Conditioning], start: int, end: int) -> Conditioning:
    return Conditioning(torch.cat([c.hidden for c in cond[start:end]]), torch.cat([c.pooled for c in cond[start:end]]))


class _HostPreprocess:
    """The host's `preprocess`, below LoraAdapters in the MRO: LoraAdapters.preprocess (a LoRA SD.Next could not
    load is an error) runs first and ends in this one via super()."""

    def preprocess(self, p: Any, args: dict[str, Any]) -> None:
        if self.host is not None:
            self.host.preprocess(self, p, args)


class StableCascadeSingleFilePipeline(LoraAdapters, _HostPreprocess, StableCascadeCombinedPipeline):
    """Stable Cascade from single files (ComfyUI / Stability / kohya layouts) on our engine, for SD.Next."""

    _engine: CascadePipeline | None = None
    host: PipelineHost | None = None
    load_error: Exception | None = None

    @classmethod
    def from_engine(cls, engine: CascadePipeline, host: PipelineHost | None = None) -> "StableCascadeSingleFilePipeline":
        """Wrap a loaded engine; its modules are registered the way diffusers' combined pipeline registers them."""
        with _quiet_deprecation():
            pipe = cls(
                tokenizer=engine.tokenizer,
                text_encoder=None,  # the decoder needs no text encoder: its pooled input comes from the prior's
                decoder=engine.decoder,
                scheduler=DDPMWuerstchenScheduler(),
                vqgan=engine.stage_a,
                prior_prior=engine.prior,
                prior_text_encoder=engine.text_encoder,
                prior_tokenizer=engine.tokenizer,
                prior_scheduler=DDPMWuerstchenScheduler(),
            )
        pipe._engine = engine
        pipe.host = host
        return pipe

    @classmethod
    def unavailable(cls, error: Exception) -> "StableCascadeSingleFilePipeline":
        """A model whose files could not be loaded: every generation raises `error` (see extension/loader.py)."""
        with _quiet_deprecation():
            pipe = cls(tokenizer=None, text_encoder=None, decoder=None, scheduler=DDPMWuerstchenScheduler(),
                       vqgan=None, prior_prior=None, prior_text_encoder=None, prior_tokenizer=None,
                       prior_scheduler=DDPMWuerstchenScheduler())
        pipe.load_error = error
        return pipe

    @property
    def engine(self) -> CascadePipeline:
        """The engine, re-pointed at the modules currently registered (hosts may replace them, e.g. quantised)."""
        if self._engine is None:
            raise RuntimeError("StableCascadeSingleFilePipeline must be built with from_engine()")
        e = self._engine
        e.prior = self.prior_pipe.prior
        e.text_encoder = self.prior_pipe.text_encoder
        e.decoder = self.decoder_pipe.decoder
        e.stage_a = self.vqgan
        return e

    @property
    def placement_owns_devices(self) -> bool:
        """True while the engine's memory executor decides what is on the device (SD.Next offload mode `none`, a
        non-resident plan): then whole-pipeline moves are ignored, because they would undo the plan. Read live, so
        an out-of-memory fallback from `resident` to `stage` takes over from SD.Next's moves at once."""
        from .offload import is_managed

        engine = getattr(self, "_engine", None)
        return engine is not None and is_managed(engine.placement)

    @property
    def device(self) -> torch.device:
        if self.placement_owns_devices:
            return self.engine.device
        return super().device

    def to(self, *args, **kwargs):
        if self.placement_owns_devices:
            log.debug("Stable Cascade: the memory plan %r places the weights; ignoring .to(%s)",
                      getattr(self.engine.placement, "name", "?"), args or kwargs)
            return self
        return super().to(*args, **kwargs)

    def preprocess(self, p: Any, args: dict[str, Any]) -> None:
        """SD.Next calls this with its request object and the call arguments just before `__call__`."""
        if self.load_error is not None:
            raise self.load_error
        try:
            super().preprocess(p, args)  # LoraAdapters, then _HostPreprocess
        except LoraError as e:  # a LoRA file of the prompt that cannot be used: 422, like an unusable model file
            raise CascadeHostError(f"Stable Cascade {e}", 422) from e

    # --- conditioning -----------------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> list[Conditioning]:
        """One conditioning (1, 77·k, D) per text. Each distinct text is encoded on its own, never tiled to the
        length of another prompt of the batch, so an image does not depend on the prompts it is batched with."""
        encoded: dict[str, Conditioning] = {}
        for text in dict.fromkeys(texts):
            encoded[text] = self.engine.encode([text])
        return [encoded[t] for t in texts]

    def _conditioning(self, prompts: list[str] | None, embeds: torch.Tensor | None, pooled: torch.Tensor | None,
                      batch: int, what: str) -> list[Conditioning]:
        if prompts is not None:
            return self._encode(prompts)
        if embeds is None:
            return self._encode([""] * batch)
        if pooled is None:
            raise InvalidRequestError(
                f"{what} embeddings were given without pooled embeddings; pass prompt_embeds_pooled or "
                "pooled_prompt_embeds too, or pass the prompt text"
            )
        hidden = embeds.float()
        pooled = _pooled(pooled.float(), hidden.shape[0])
        if hidden.shape[0] != batch and batch % hidden.shape[0] == 0:  # one row per prompt: num_images_per_prompt
            per_prompt = batch // hidden.shape[0]
            hidden, pooled = hidden.repeat_interleave(per_prompt, 0), pooled.repeat_interleave(per_prompt, 0)
        return [Conditioning(hidden[i : i + 1], pooled[i : i + 1]) for i in range(hidden.shape[0])]

    # --- the call SD.Next makes -------------------------------------------------------------------------------
    def __call__(  # noqa: PLR0913 - SD.Next fills named parameters only
        self,
        prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        prior_num_inference_steps: int = default_prior().steps,
        prior_guidance_scale: float = default_prior().cfg,
        num_inference_steps: int = default_decoder().steps,
        decoder_guidance_scale: float = default_decoder().cfg,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_pooled: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_pooled: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end: Callable | None = None,
        prior_callback_on_step_end_tensor_inputs: list[str] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prior_sampler: str = default_prior().sampler,
        prior_scheduler: str = default_prior().scheduler,
        prior_shift: float = default_prior().shift,
        decoder_sampler: str = default_decoder().sampler,
        decoder_scheduler: str = default_decoder().scheduler,
        decoder_shift: float = default_decoder().shift,
        compression: float = 42.0,
        stage_a_scale: float = STAGE_A_SCALE,
        guidance_rescale: float = 0.0,
        seeds: list[int] | None = None,
        image: Any = None,
        strength: float | None = None,
        cascade_fields: Mapping[str, Any] | None = None,
    ):
        """Generate images. Prior: steps/CFG/sampler of Stage C; decoder: Stage B's; `seeds` or `generator`
        (one per image) seed each image's noise, so image i of a batch equals a single run with its seed.
        `image` + `strength` (diffusers' img2img arguments, what SD.Next's img2img fills): Stage C img2img, the request
        fields `image` and `prior_denoise` (strength 0.8 when only an image is given); one image for the batch or one
        per image. `cascade_fields`: any other flat request fields (cascade.request.build_request names)."""
        if self.load_error is not None:
            raise self.load_error
        host = self.host or PipelineHost()
        try:
            if latents is not None:
                raise InvalidRequestError("initial latents are not supported by the Stable Cascade pipeline")
            if output_type not in ("np", "pil", "pt"):
                raise InvalidRequestError(f"output_type {output_type!r} is not supported (use 'np', 'pil' or 'pt')")
            prompts = _as_list(prompt) if prompt is not None or prompt_embeds is None else None
            n_prompts = len(prompts) if prompts is not None else int(prompt_embeds.shape[0])
            batch = n_prompts * int(num_images_per_prompt)
            if prompts is not None:
                prompts = [t for t in prompts for _ in range(num_images_per_prompt)]
            negatives = None
            if prompts is not None or negative_prompt is not None or negative_prompt_embeds is None:
                negatives = _as_list(negative_prompt, n_prompts)
                if len(negatives) != n_prompts:
                    raise InvalidRequestError(f"{len(negatives)} negative prompts for {n_prompts} prompts")
                negatives = [t for t in negatives for _ in range(num_images_per_prompt)]
            all_seeds = _seed_list(seeds, generator, batch)
            inits = _init_images(image, batch)
            if inits is None and strength is not None:
                raise InvalidRequestError(f"strength {strength} was given without an image to start from; pass "
                                          "`image` (img2img) or leave strength out")
            image_fields = {} if inits is None else {
                "image": inits[0], "prior_denoise": DEFAULT_STRENGTH if strength is None else strength}
            # One request for the whole call through the engine's one constructor (names resolved, every value
            # checked); each run of consecutive seeds below is this request with its seed and batch size.
            base = build_request({
                "prompt": (prompts or [""])[0], "negative_prompt": (negatives or [""])[0], "width": width,
                "height": height, "seed": all_seeds[0], "batch_size": 1,
                "prior_steps": prior_num_inference_steps, "prior_cfg": prior_guidance_scale,
                "prior_sampler": prior_sampler, "prior_scheduler": prior_scheduler, "prior_shift": prior_shift,
                "decoder_steps": num_inference_steps, "decoder_cfg": decoder_guidance_scale,
                "decoder_sampler": decoder_sampler, "decoder_scheduler": decoder_scheduler,
                "decoder_shift": decoder_shift, "compression": compression, "stage_a_scale": stage_a_scale,
                "cfg_rescale": guidance_rescale or 0.0, **image_fields, **(cascade_fields or {}),
            })
            prior, decoder = base.prior, base.decoder
            if prompts is not None and prompt_embeds is not None:
                log.debug("Stable Cascade: prompt text given; host prompt embeddings are not used (re-encoded)")
            cond = self._conditioning(prompts, prompt_embeds, prompt_embeds_pooled if prompt_embeds_pooled is not None
                                      else pooled_prompt_embeds, batch, "prompt")
            uncond = self._conditioning(negatives, negative_prompt_embeds,
                                        negative_prompt_embeds_pooled if negative_prompt_embeds_pooled is not None
                                        else negative_pooled_prompt_embeds, batch, "negative prompt")
            if len(cond) != batch or len(uncond) != batch:
                raise InvalidRequestError(f"{len(cond)} prompt and {len(uncond)} negative prompt conditionings for "
                                          f"{batch} images")
            keys = _image_keys(inits) or [0] * batch
            runs = _consecutive_runs(all_seeds, [(c.hidden.shape[1], u.hidden.shape[1], k)
                                                 for c, u, k in zip(cond, uncond, keys)])
            totals = {stage: len(sampling.sigmas_for(st.sampler, st.scheduler, st.steps, st.shift, st.denoise)) - 1
                      for stage, st in (("prior", prior), ("decoder", decoder))}
            host.begin((totals["prior"] + totals["decoder"]) * len(runs))
        except Exception as e:
            raise host_error(e, "request") from e

        callbacks = {"prior": prior_callback_on_step_end, "decoder": callback_on_step_end}
        previews = {"on": True}

        def on_step(event: StepEvent) -> None:
            method = host.preview_method(event) if previews["on"] and event.preview is None else None
            if method is not None:
                try:
                    event.preview = self.engine.preview(event, method)
                except Exception as e:  # noqa: BLE001 - a preview must not end the generation; said once, then off
                    log.warning("Stable Cascade: live previews are off for this generation: %s", e)
                    previews["on"] = False
            host.step(event)
            cb = callbacks.get(event.stage)
            if cb is not None:
                cb(self, event.step - 1, event.sigma, {"latents": event.latents})

        finished: list[torch.Tensor] = []
        interrupted = False
        try:
            for start, end in runs:
                request = replace(base, seed=all_seeds[start], batch_size=end - start,
                                  image=inits[start] if inits is not None else base.image)
                result = self.engine.generate(
                    request, callback=on_step, interrupt=host.should_stop,
                    cond=_rows(cond, start, end), uncond=_rows(uncond, start, end))
                finished.append(result.images)
        except GenerationInterrupted as e:
            log.info("Stable Cascade: %s", e)
            interrupted = True
            host.stopped()
        except Exception as e:
            raise host_error(e, "generation") from e

        images = torch.cat(finished) if finished else torch.zeros((0, 3, int(height), int(width)))
        out_images: Any
        if output_type == "np":
            out_images = images.permute(0, 2, 3, 1).float().numpy()
        elif output_type == "pil":
            out_images = to_pil(images)
        else:
            out_images = images
        done_seeds = all_seeds[: images.shape[0]]
        if not return_dict:
            return (out_images,)
        return CascadePipelineOutput(images=out_images, seeds=done_seeds, interrupted=interrupted)
