"""What a request's images become before sampling: init latents for both stages and Stage C's `clip_img`.

Each step follows ComfyUI, named where it is done:
- Stage C init latent: LoadImage -> ImageScale(width, height, bicubic, crop center) ->
  StableCascade_StageC_VAEEncode (bicubic centre-crop resize to W // c * 32 x H // c * 32, VAE.process_input
  x*2-1, EfficientNetEncoder) -> `.float()`; SC_Prior.process_in is x 1.0.
- Stage B init latent: ImageScale to the output size -> VAEEncode with Stage A (process_input identity, pixels in
  [0, 1], unquantised `encode`) -> SC_B.process_in = latent * (1 / 0.43) into the sampler's model space.
- clip_img: CLIPVisionEncode(crop="center") + unCLIPConditioning per image prompt; StableCascade_C.extra_conds
  stacks `image_embeds.unsqueeze(0) * strength` along dim 1 -> (1, N, 768); strength 0 drops the image
  (unCLIPConditioning returns the conditioning unchanged); no image prompt -> zeros (1, 1, 768), also for the
  negative prompt, which carries no unCLIP conditioning. noise_augmentation is not used by Stable Cascade.
Noising an init latent at a denoise strength is `cascade.sampling` (KSampler.set_steps sigmas, EPS.noise_scaling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import images
from .errors import CascadeError


@dataclass
class PriorImageInputs:
    """Stage C's image-derived inputs for one request (batch 1; the pipeline repeats them over the batch)."""

    init: torch.Tensor | None = None  # (1, 16, H//c, W//c) fp32, the encoded init image
    clip_img: torch.Tensor | None = None  # (1, N, D) fp32, image-prompt embeddings x strength; None = zeros


def _finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise CascadeError(f"the {what} produced non-finite values; try --dtype fp32, or check the file")
    return tensor


@torch.inference_mode()
def stage_c_init_latent(encoder: nn.Module, image, width: int, height: int, compression: float) -> torch.Tensor:
    """The EfficientNet encoding of `image` fitted to width x height: (1, 16, H // c, W // c) fp32."""
    pixels = images.fit(images.to_tensor(image, "init image"), width, height)
    x = images.stage_c_encoder_input(pixels, compression)
    weight = next(encoder.parameters())
    latent = encoder(x.to(weight.device, weight.dtype)).float()
    return _finite(latent, "Stage C encoder")


@torch.inference_mode()
def clip_image_embeddings(vision: nn.Module, prompts: Sequence, strength: float) -> torch.Tensor | None:
    """(1, N, D) fp32 image-prompt conditioning, or None (= the zeros of a request without image prompts)."""
    from .models.clip_vision import image_embeds

    if strength == 0 or not prompts:
        return None
    size = int(vision.config.image_size)
    weight = next(vision.parameters())
    embeds = []
    for i, image in enumerate(prompts):
        pixels = images.clip_vision_input(images.to_tensor(image, f"image prompt {i + 1}"), size)
        embed = image_embeds(vision, pixels.to(weight.device, torch.float32))  # (1, D)
        embeds.append(embed.unsqueeze(0) * strength)
    return _finite(torch.cat(embeds, dim=1), "CLIP vision encoder")


def zero_clip_img(batch: int, dim: int, device, dtype) -> torch.Tensor:
    """Stage C's `clip_img` without image prompts: zeros (B, 1, D) (ComfyUI StableCascade_C.extra_conds)."""
    return torch.zeros(batch, 1, dim, device=device, dtype=dtype)


@torch.inference_mode()
def stage_b_init_latent(stage_a: nn.Module, image, width: int, height: int, scale: float, overlap: int) -> torch.Tensor:
    """The Stage A encoding of `image` fitted to width x height, in Stage B's model space (latent * (1 / scale)):
    (1, 4, H / 4, W / 4) fp32. Encoded in strips (exact, see `encode_in_strips`)."""
    if not hasattr(stage_a, "encode"):
        raise CascadeError("Stage B img2img needs Stage A's encoder, which this backend's compiled Stage A lacks; "
                           "use a torch device (cuda, xpu, cpu) for --decoder-image")
    pixels = images.fit(images.to_tensor(image, "decoder image"), width, height)
    weight = next(stage_a.parameters())
    latent = encode_in_strips(stage_a, pixels.to(weight.device, weight.dtype), overlap).float()
    return _finite(latent * (1.0 / scale), "Stage A encoder")


ENCODE_STRIP_PIXELS = 512 * 256  # image pixels Stage A encodes at once (its activations are 48x the input at 2x)


def encode_in_strips(stage_a: nn.Module, pixels: torch.Tensor, overlap: int = 16) -> torch.Tensor:
    """Stage A `encode` of (1, 3, H, W) in row strips with `overlap` latent rows of context each side; exact.

    Every latent row depends only on pixels within a few latent rows (1x1 and depthwise 3x3 convolutions, one
    4x4 stride-2 convolution, no global statistics in eval mode), so decoding the context and cropping it away
    gives the same latent as one pass, with a fraction of the activation memory.
    """
    height, width = pixels.shape[-2] // 4, pixels.shape[-1] // 4
    rows = max(1, ENCODE_STRIP_PIXELS // (16 * width))
    if height <= rows + overlap:
        return stage_a.encode(pixels)
    pieces = []
    for lo in range(0, height, rows):
        hi = min(height, lo + rows)
        read_lo, read_hi = max(0, lo - overlap), min(height, hi + overlap)
        out = stage_a.encode(pixels[:, :, 4 * read_lo : 4 * read_hi])
        pieces.append(out[:, :, lo - read_lo : hi - read_lo])
    return torch.cat(pieces, dim=2)
