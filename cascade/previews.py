"""Live previews of a sampling step: a small RGB image of the current denoised estimate.

Two methods, as in ComfyUI:
- "previewer": Stage C's own previewer network (the file's `vae.previewer.*`, or Stability's previewer.safetensors),
  16 channels -> RGB at 8x the latent; ComfyUI decodes a Stage C latent with it as a VAE (comfy/sd.py
  StageC_coder.decode, then `process_output` = clamp((x + 1) / 2, 0, 1)).
- "rgb": ComfyUI's Latent2RGBPreviewer (latent_preview.py) with comfy/latent_formats.py's factors — `SC_Prior`
  16x3 for Stage C, `SC_B` 4x3 for Stage B — a per-pixel linear map, at the latent's own size.
"auto" uses the previewer for Stage C when it is loaded, else the factors; Stage B always uses the factors.
Both map the result as ComfyUI's `preview_to_image`: ((x + 1) / 2).clamp(0, 1) * 255, truncated to uint8. Only the
first image of a batch is previewed (ComfyUI previews `x0[0]`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

METHODS = ("auto", "previewer", "rgb")

# comfy/latent_formats.py SC_Prior.latent_rgb_factors (rows: latent channels; columns: R, G, B)
SC_PRIOR_RGB = (
    (-0.0326, -0.0204, -0.0127),
    (-0.1592, -0.0427, 0.0216),
    (0.0873, 0.0638, -0.0020),
    (-0.0602, 0.0442, 0.1304),
    (0.0800, -0.0313, -0.1796),
    (-0.0810, -0.0638, -0.1581),
    (0.1791, 0.1180, 0.0967),
    (0.0740, 0.1416, 0.0432),
    (-0.1745, -0.1888, -0.1373),
    (0.2412, 0.1577, 0.0928),
    (0.1908, 0.0998, 0.0682),
    (0.0209, 0.0365, -0.0092),
    (0.0448, -0.0650, -0.1728),
    (-0.1658, -0.1045, -0.1308),
    (0.0542, 0.1545, 0.1325),
    (-0.0352, -0.1672, -0.2541),
)
# comfy/latent_formats.py SC_B.latent_rgb_factors; applied to the Stage B latent in model space (ComfyUI previews
# the sampler's x0, i.e. after process_in = latent / 0.43), which is what our pipeline samples.
SC_B_RGB = (
    (0.1121, 0.2006, 0.1023),
    (-0.2093, -0.0222, -0.0195),
    (-0.3087, -0.1535, 0.0366),
    (0.0290, -0.1574, -0.4078),
)
FACTORS = {"prior": SC_PRIOR_RGB, "decoder": SC_B_RGB}


def latent_rgb(latents: torch.Tensor, stage: str) -> torch.Tensor:
    """(B, C, h, w) -> (h, w, 3) in ComfyUI's [-1, 1] preview space: Latent2RGBPreviewer.decode_latent_to_preview."""
    factors = torch.tensor(FACTORS[stage], dtype=latents.dtype, device=latents.device).transpose(0, 1)
    return torch.nn.functional.linear(latents[0].movedim(0, -1), factors)


@torch.inference_mode()
def previewer_rgb(previewer: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """(B, 16, h, w) -> (8h, 8w, 3) in [-1, 1] through the previewer network (first image only)."""
    weight = next(previewer.parameters())
    out = previewer(latents[:1].to(weight.device, weight.dtype))
    return out[0].float().movedim(0, -1)


def to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """ComfyUI latent_preview.preview_to_image: ((x + 1) / 2).clamp(0, 1) * 255 as uint8 (truncated), on the CPU."""
    return ((rgb.float() + 1.0) / 2.0).clamp(0, 1).mul(0xFF).to(device="cpu", dtype=torch.uint8)


def preview_pixels(latents: torch.Tensor, stage: str, previewer: nn.Module | None = None,
                   method: str = "auto") -> torch.Tensor:
    """(H, W, 3) uint8 preview of the first image of `latents` for `stage` ("prior" | "decoder")."""
    if method not in METHODS:
        raise ValueError(f"unknown preview method {method!r}; use one of {', '.join(METHODS)}")
    use_previewer = stage == "prior" and previewer is not None and method in ("auto", "previewer")
    if method == "previewer" and stage == "prior" and previewer is None:
        raise ValueError("the previewer is not loaded; use method 'rgb' or 'auto'")
    rgb = previewer_rgb(previewer, latents) if use_previewer else latent_rgb(latents.float(), stage)
    return to_uint8(rgb)


def preview_image(latents: torch.Tensor, stage: str, previewer: nn.Module | None = None, method: str = "auto"):
    """The preview as a PIL image."""
    from PIL import Image

    return Image.fromarray(preview_pixels(latents, stage, previewer, method).numpy())


def preview_shape(latent_shape: tuple[int, ...], stage: str, with_previewer: bool) -> tuple[int, int]:
    """(height, width) of the preview for a latent of `latent_shape` (B, C, h, w)."""
    scale = 8 if stage == "prior" and with_previewer else 1
    return latent_shape[2] * scale, latent_shape[3] * scale


def every(n: int) -> Callable[[int, int], bool]:
    """Whether step `step` (1-based) of `total` gets a preview: every n-th step and always the last; n <= 0 never."""

    def due(step: int, total: int) -> bool:
        return n > 0 and (step % n == 0 or step == total)

    return due
