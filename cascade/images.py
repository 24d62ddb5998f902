"""Input images: opening and checking them, and the resizes/normalisations each image input needs.

Requests carry decoded PIL images (`load_image(path)` for files), so a host that already has pixels (SD.Next, the
server) passes them as they are. What is accepted, and how it is converted (ComfyUI's LoadImage where it has a rule):
- any still image PIL can decode; EXIF orientation applied (ComfyUI `ImageOps.exif_transpose`);
- alpha (RGBA, LA, palette transparency) is dropped, the stored RGB kept — ComfyUI's `convert("RGB")`; a warning is
  logged when the image really has transparent pixels;
- 16-bit greyscale (PNG/TIFF "I;16", "I") is scaled from its full 0-65535 range (ComfyUI divides mode "I" by 255 and
  clips, which whitens such images; we keep the precision instead); 16-bit RGB PNGs reach us as 8-bit from PIL;
- refused with an ImageError that says what to do: a path that does not exist or is not an image, an unreadable or
  truncated file, an animated image (several frames; MPO camera files use their first frame, as ComfyUI does), a
  floating-point or other unusual pixel mode (LAB, HSV, premultiplied alpha), and images smaller than MIN_SIDE
  pixels on a side.

Resizing follows ComfyUI: comfy/utils.py `common_upscale(samples, width, height, method, crop="center")`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidRequestError
from .request import REQUEST_MAX_BYTES, REQUEST_MAX_PIXELS

log = logging.getLogger(__name__)

MIN_SIDE = 16  # pixels; a 1x1 or thumbnail-sized "image" is a mistake, not a picture to start from
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LA", "PA")  # convert("RGB") handles these
RESIZE_METHOD = "bicubic"  # ComfyUI StableCascade_StageC_VAEEncode; also used to fit an image to the request size


class ImageError(InvalidRequestError):
    """An input image cannot be used (missing, not an image, animated, too small, float pixels)."""


def _open(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise ImageError(f"{what}: no such file {path}")
    if not path.is_file():
        raise ImageError(f"{what}: {path} is not a file")
    if path.name not in what:  # callers may already name the file ("init image in.png")
        what = f"{what} {path.name}"
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not halfway through a generation
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image PIL can read; use a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what} is too large to open safely ({err}); scale it down first") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{what} cannot be read ({err}); the file may be truncated or damaged — "
                         "re-save it as PNG") from None
    return image


def load_image(source: Any, what: str = "image") -> "Image.Image":  # noqa: F821
    """A checked still image from a path or a PIL image (`what` names the input in messages: "init image"...)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, Path)):
        image = _open(Path(source).expanduser(), what)
    else:
        raise ImageError(f"{what} must be a PIL image or a path to an image file, got {type(source).__name__}")
    check_image(image, what)
    return image


def check_image(image: Any, what: str = "image") -> None:
    """Raise ImageError when `image` cannot be used as an input (see the module doc for the rules)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ImageError(f"{what} must be a PIL image (load files with cascade.images.load_image), "
                         f"got {type(image).__name__}")
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":
        raise ImageError(f"{what} is animated ({frames} frames); pass a still image (export one frame as PNG)")
    if image.mode not in EIGHT_BIT_MODES + SIXTEEN_BIT_MODES:
        kind = "floating-point" if image.mode == "F" else f"{image.mode!r}"
        raise ImageError(f"{what} has {kind} pixels, which are not converted; save it as an 8-bit or 16-bit PNG")
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{what} is {width}x{height}; it needs at least {MIN_SIDE}x{MIN_SIDE} pixels")


def to_tensor(image: "Image.Image", what: str = "image") -> torch.Tensor:  # noqa: F821
    """A checked PIL image -> (1, 3, H, W) float32 RGB in [0, 1] (ComfyUI LoadImage, 16-bit as in the module doc)."""
    from PIL import ImageOps

    check_image(image, what)
    if image.format == "MPO":
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64)
        grey = np.clip(grey / 65535.0, 0.0, 1.0).astype(np.float32)
        array = np.repeat(grey[..., None], 3, axis=2)
    else:
        if _has_transparency(image):
            log.warning("%s has transparent pixels: the alpha channel is dropped and the stored colours used "
                        "(as ComfyUI's LoadImage does); flatten it onto a background first for other results", what)
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0).contiguous()


def _has_transparency(image) -> bool:
    if "A" in image.getbands():
        lo, _ = image.getchannel("A").getextrema()
        return lo < 255
    if image.mode == "P" and "transparency" in image.info:
        lo, _ = image.convert("RGBA").getchannel("A").getextrema()
        return lo < 255
    return False


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str = RESIZE_METHOD,
                   crop: str = "center") -> torch.Tensor:
    """ComfyUI comfy/utils.py `common_upscale` for (B, C, H, W): centre-crop to the target aspect, then resize.

    The crop offsets are ComfyUI's: `round((old - old * (new_aspect / old_aspect)) / 2)` on the long side.
    Methods are torch's `F.interpolate` modes (ComfyUI's bislerp/lanczos are not offered).
    """
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        if old_w - 2 * x < 1 or old_h - 2 * y < 1:
            raise ImageError(f"an image of {old_w}x{old_h} cannot be cropped to the aspect ratio of {width}x{height}")
        samples = samples.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)
    elif crop != "disabled":
        raise ValueError(f"crop must be 'center' or 'disabled', got {crop!r}")
    return F.interpolate(samples, size=(height, width), mode=method)


def fit(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """An input image at the request's size: unchanged when it already is, else ComfyUI's ImageScale with
    crop="center" and bicubic (the workflow LoadImage -> ImageScale(width, height, center) -> encode)."""
    if pixels.shape[-1] == width and pixels.shape[-2] == height:
        return pixels
    return common_upscale(pixels, width, height, RESIZE_METHOD, "center")


def stage_c_encoder_input(pixels: torch.Tensor, compression: float, downscale: int = 32) -> torch.Tensor:
    """ComfyUI StableCascade_StageC_VAEEncode: resize to (W // compression * 32, H // compression * 32), bicubic with
    a centre crop, keep RGB, then VAE.process_input (x * 2 - 1): the EfficientNet encoder's input in [-1, 1].

    (The encoder undoes the *2-1 and applies the ImageNet normalisation itself, as ComfyUI's EfficientNetEncoder.)
    """
    height, width = pixels.shape[-2], pixels.shape[-1]
    out_w, out_h = int(width // compression * downscale), int(height // compression * downscale)
    s = common_upscale(pixels, out_w, out_h, RESIZE_METHOD, "center")[:, :3]
    return s * 2.0 - 1.0


def clip_vision_input(pixels: torch.Tensor, size: int, mean=None, std=None, crop: bool = True) -> torch.Tensor:
    """ComfyUI comfy/clip_model.py `clip_preprocess`: the short side to `size` (bicubic, antialiased, rounded sizes),
    a centre crop, quantisation to 8-bit steps, then the OpenAI CLIP normalisation."""
    from .models.clip_vision import CLIP_MEAN, CLIP_STD

    image = pixels[:, :3]
    mean = torch.tensor(mean or CLIP_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(std or CLIP_STD, dtype=image.dtype).view(3, 1, 1)
    if not (image.shape[2] == size and image.shape[3] == size):
        if crop:
            scale = size / min(image.shape[2], image.shape[3])
            scaled = (round(scale * image.shape[2]), round(scale * image.shape[3]))
        else:
            scaled = (size, size)
        image = F.interpolate(image, size=scaled, mode="bicubic", antialias=True)
        h, w = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, h : h + size, w : w + size]
    image = torch.clip(255.0 * image, 0, 255).round() / 255.0
    return (image - mean) / std


def decode_base64_image(data: str, max_pixels: int = REQUEST_MAX_PIXELS, max_bytes: int = REQUEST_MAX_BYTES,
                        what: str = "init image"):
    """A base64 image from a request (a `data:image/...;base64,` prefix allowed) -> PIL, within the size limits.
    The pixel count is checked from the header before the pixels are decoded (no decompression bombs). The server
    and the SD.Next extension (per-request image prompts) both decode request images here."""
    import base64
    import binascii
    import io

    from PIL import Image

    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > max_bytes * 4 // 3 + 4:
        raise InvalidRequestError(f"{what} is larger than {max_bytes // (1024 * 1024)} MiB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception:  # noqa: BLE001 - PIL raises many types for a file that is not an image
        raise InvalidRequestError(f"{what} is not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequestError(f"{what} is {width}x{height} = {width * height} pixels; this server accepts at "
                                  f"most {max_pixels}")
    try:
        image.load()
    except Exception as err:  # noqa: BLE001
        raise InvalidRequestError(f"{what} could not be decoded ({err}); send a complete PNG or JPEG") from None
    return image
