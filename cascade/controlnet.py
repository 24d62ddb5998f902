"""Stage C ControlNets (Stability's canny, inpainting and super-resolution files), run the way ComfyUI runs them.

Facts, each from the code that defines it:
- Detection (comfy/controlnet.py `load_t2i_adapter`): `backbone.0.0.weight` = EfficientNet backbone (its input
  width is `c_in`: 1 canny, 4 inpainting; hint resized to latent x 32, bilinear); `backbone.10.blocks.0.weight` =
  the "large" backbone (super-resolution, c_in 16 = Stage C encoder latents; hint resized to latent x 1,
  nearest-exact). Both take proj_blocks [0, 4, 8, 12, 51, 55, 59, 63] and 2048-wide projections: big Stage C only.
- The hint (`T2IAdapter.get_control`): `common_upscale(hint, W, H, method, "center")` to the latent size times the
  compression above, W and H rounded *up* to multiples of 8 (`scale_image_to`, unshuffle_amount 8); a 1-channel
  ControlNet gets the channel mean. The ControlNet runs once per sampling (the hint does not depend on x or sigma),
  in float32 (ComfyUI runs it at the sampler state's dtype), its outputs times `strength` are the residuals.
- Start/end (`ControlBase.pre_run`, `get_control`): `percent_to_sigma` on the Stage C schedule (shifted); a step
  at sigma s gets the residuals unless s > sigma(start) or s < sigma(end). Several ControlNets add their residuals.
- nodes.py `ControlNetApplyAdvanced` puts the ControlNet on the positive *and* the negative conditioning;
  strength 0 returns the conditioning unchanged (no ControlNet at all).
- Hints per type: canny = an edge map (`canny_edges` computes one: ComfyUI's Canny node, kornia's algorithm,
  thresholds 0.4/0.8); inpainting = Stability's InpaintFilter layout, RGB with the masked pixels set to white plus
  the mask as 4th channel (1 = repaint) (Stability-AI/StableCascade modules/controlnet.py); super-resolution =
  the Stage C encoder's latent of the small image (comfy_extras/nodes_stable_cascade.py
  `StableCascade_SuperResolutionControlnet`: VAE.encode, which crops to multiples of 32 first).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CONTROLNET, METADATA_CONFIG, Part, checkpoint_from_header, printable
from .errors import CascadeError, CheckpointError

log = logging.getLogger(__name__)

MAX_CONTROLNETS = 8
STRENGTH_RANGE = (0.0, 10.0)  # ControlNetApplyAdvanced's strength widget
KINDS = {("effnet", 1): "canny", ("effnet", 4): "inpainting", ("large", 16): "super-resolution"}
HINT = {"effnet": (32, "bilinear"), "large": (1, "nearest-exact")}  # compression ratio, upscale algorithm
UNSHUFFLE = 8
CANNY_THRESHOLDS = (0.4, 0.8)  # ComfyUI's Canny node defaults


# --- request entries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlEntry:
    """One ControlNet of a request: file, hint image (PIL), strength, start/end percent, and for inpainting a mask
    (PIL, white = repaint)."""

    path: str
    image: Any
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mask: Any = None


def as_entry(item: Any) -> ControlEntry:
    """A ControlEntry from itself, a dict of its fields or a (path, image[, strength[, start, end[, mask]]]) tuple."""
    if isinstance(item, ControlEntry):
        return item
    if isinstance(item, dict):
        return ControlEntry(**item)
    if isinstance(item, (tuple, list)) and 2 <= len(item) <= 6 and len(item) != 4:
        return ControlEntry(*item)
    raise TypeError("a ControlNet is (path, image[, strength[, start, end[, mask]]])")


def entry_problems(items: Sequence[Any]) -> list[str]:
    """Request validation: count, file name, image(s), strength and start <= end in range."""
    from .images import ImageError, check_image

    problems = []
    if len(items) > MAX_CONTROLNETS:
        problems.append(f"{len(items)} ControlNets: at most {MAX_CONTROLNETS}")
    lo, hi = STRENGTH_RANGE
    for i, item in enumerate(items):
        what = f"ControlNet {i + 1}"
        try:
            entry = as_entry(item)
        except TypeError as err:
            problems.append(f"{what}: {err}")
            continue
        if not entry.path:
            problems.append(f"{what} has no file name")
        for name, image in (("image", entry.image), ("mask", entry.mask)):
            if image is not None or name == "image":
                try:
                    check_image(image, f"{what} {name}")
                except ImageError as err:
                    problems.append(str(err))
        numbers = (("strength", entry.strength, lo, hi), ("start", entry.start, 0.0, 1.0), ("end", entry.end, 0.0, 1.0))
        bad = False
        for name, value, a, b in numbers:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not a <= value <= b:
                problems.append(f"{what} {name} {value!r} must be a number from {a:g} to {b:g}")
                bad = True
        if not bad and entry.start > entry.end:
            problems.append(f"{what} start {entry.start:g} is after its end {entry.end:g}")
    return problems


# --- files -------------------------------------------------------------------------------------------------------


def _shape(part: Part, key: str) -> tuple[int, ...] | None:
    return tuple(part.info(key).shape) if key in part.key_header else None


def config_from_part(part: Part) -> dict[str, Any]:
    """The ControlNet config from the tensors (official layouts), else from our tiny files' metadata."""
    from .models.controlnet import official_config

    name = printable(part.headers[0].path.name)
    projections = {k.split(".")[1] for k in part.keys if k.startswith("projections.")}
    if "backbone.0.0.weight" in part.key_header:
        backbone, c_in = "effnet", _shape(part, "backbone.0.0.weight")[1]
        official = _shape(part, "backbone.7.0.weight") == (1280, 256, 1, 1) and "backbone.6.14.block.0.0.weight" in part.key_header
    elif "backbone.10.blocks.0.weight" in part.key_header:
        backbone, c_in = "large", _shape(part, "backbone.0.weight")[1]
        official = _shape(part, "backbone.0.weight")[0] == 16384 and _shape(part, "backbone.11.weight") == (1280, 1024, 1, 1)
    else:
        raise CheckpointError(f"{name}: a Stage C ControlNet of neither known backbone (no backbone.0.0.weight for the "
                              "EfficientNet type, no backbone.10.blocks.0.weight for the large type)")
    official = official and len(projections) == 8 and _shape(part, "projections.0.2.weight") == (2048, 1280, 1, 1)
    if official:
        return official_config(backbone, c_in)
    raw = part.headers[0].metadata.get(METADATA_CONFIG + CONTROLNET)
    if raw:
        from .checkpoints import metadata_config

        return metadata_config(part.headers[0], CONTROLNET, config_problem)
    raise CheckpointError(f"{name}: a Stage C ControlNet ({backbone} backbone) of an unknown size "
                          f"({len(projections)} projections); only Stability's released layout is supported")


def config_problem(config: Any) -> str | None:
    """What makes a ControlNet config unusable (tiny files carry one in their metadata), bounded like other configs."""
    from .side_parts import config_problem as effnet_problem

    if not isinstance(config, dict) or config.get("backbone") not in ("effnet", "large"):
        return "backbone must be 'effnet' or 'large'"
    ints = {"c_in": 64, "c_proj": 8192, "embed": 8192}
    if config["backbone"] == "large":
        ints |= {"hidden": 65536, "width": 8192, "res_blocks": 64}
    for key, hi in ints.items():
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
            return f"`{key}` must be a whole number from 1 to {hi}"
    blocks = config.get("proj_blocks")
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 256 or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 1024 for b in blocks):
        return "`proj_blocks` must be a list of 1 to 256 block indices"
    if config["backbone"] == "effnet":
        return effnet_problem("effnet", config.get("effnet"))
    return None


@dataclass
class ControlNetFile:
    """A scanned ControlNet file: its part (headers only), config and type name."""

    path: Path
    part: Part
    config: dict[str, Any]

    @property
    def backbone(self) -> str:
        return self.config["backbone"]

    @property
    def kind(self) -> str:
        return KINDS.get((self.backbone, self.config["c_in"]), f"{self.backbone} ({self.config['c_in']} channels)")

    @property
    def nbytes(self) -> int:
        return self.part.numel * 4  # run in float32


def scan_controlnet(path: str | Path) -> ControlNetFile:
    """Read a ControlNet file's header and classify it by its tensors; a wrong file is a CheckpointError saying
    what it is."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ControlNet {printable(str(path))}: {'not a file' if path.exists() else 'no such file'}")
    from .checkpoints import looks_like
    from .errors import NotStableCascadeError
    from .tensorfile import read_header

    header = read_header(path)
    try:
        ckpt = checkpoint_from_header(header)
    except NotStableCascadeError:
        raise NotStableCascadeError(f"{printable(path.name)} is not a Stage C ControlNet: it looks like "
                                    f"{looks_like(set(header.keys()))}. Use Stability's Stage C ControlNets "
                                    "(stable-cascade controlnet/canny, inpainting, super_resolution.safetensors).") from None
    if CONTROLNET not in ckpt.parts:
        raise CheckpointError(f"{printable(path.name)} is a {ckpt.title}, not a Stage C ControlNet.")
    part = ckpt.parts[CONTROLNET]
    return ControlNetFile(path, part, config_from_part(part))


def check_fits(cnet: ControlNetFile, prior_config: dict[str, Any]) -> None:
    """Refuse a ControlNet whose residuals do not fit this Stage C (the lite model is 1536 wide, they are 2048)."""
    width = prior_config["block_out_channels"][0]
    if cnet.config["c_proj"] != width:
        raise CheckpointError(f"{printable(cnet.path.name)}: its residuals are {cnet.config['c_proj']} wide but this "
                              f"Stage C is {width} wide; Stability's ControlNets are for the big (3.6B) Stage C only")


def load_controlnet(cnet: ControlNetFile, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the module on meta, check every tensor's shape against the file, then fill it from the file."""
    from .loader import parameters_on_meta
    from .models.controlnet import StageCControlNet
    from .tensorfile import TensorReader

    name = printable(cnet.path.name)
    with parameters_on_meta():
        model = StageCControlNet(cnet.config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in cnet.part.key_header and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"{name}: the ControlNet is incomplete ({len(missing)} tensors missing, e.g. "
                              f"{', '.join(missing[:3])}); download it again")
    for key, tensor in expected.items():
        got = _shape(cnet.part, key)
        if got is not None and got != tuple(tensor.shape):
            raise CheckpointError(f"{name}: tensor {key} is {list(got)} in the file, the ControlNet needs "
                                  f"{list(tensor.shape)}; the file is damaged or not a Stage C ControlNet")
    state = {}
    with TensorReader(cnet.part.headers[0]) as reader:
        for key, tensor in expected.items():
            if key in cnet.part.key_header:
                state[key] = reader.get(key, dtype if tensor.is_floating_point() else None, device)
    model.load_state_dict(state, strict=False, assign=True)
    model.to(device)
    return model.eval().requires_grad_(False)


# --- hints -------------------------------------------------------------------------------------------------------


def hint_size(latent_hw: tuple[int, int], backbone: str) -> tuple[int, int]:
    """(height, width) of the hint: latent x compression ratio, each rounded up to a multiple of 8."""
    ratio = HINT[backbone][0]
    return tuple(math.ceil(side * ratio / UNSHUFFLE) * UNSHUFFLE for side in latent_hw)  # type: ignore[return-value]


def _mask_tensor(mask, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) in [0, 1] from a PIL mask (white = repaint), resized to `size` (nearest)."""
    from . import images

    m = images.to_tensor(mask, "ControlNet mask").mean(1, keepdim=True)
    if tuple(m.shape[-2:]) != size:
        m = F.interpolate(m, size=size, mode="nearest")
    return (m > 0.5).float()


def inpaint_hint(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stability's InpaintFilter layout: (1, 4, H, W) = RGB with the masked pixels white, then the mask."""
    return torch.cat([torch.where(mask > 0.5, torch.ones_like(image), image), mask], dim=1)


def pixel_hint(entry: ControlEntry, c_in: int) -> torch.Tensor:
    """The image input of an EfficientNet-type ControlNet, at the image's size, in [0, 1]."""
    from . import images

    pixels = images.to_tensor(entry.image, "ControlNet image")
    if c_in == 4:
        if entry.mask is None:
            raise CascadeError("the inpainting ControlNet needs a mask (white = repaint): FILE:IMAGE,MASK")
        return inpaint_hint(pixels, _mask_tensor(entry.mask, tuple(pixels.shape[-2:])))
    if entry.mask is not None:
        raise CascadeError(f"a mask was given to a {c_in}-channel ControlNet; only the inpainting one takes a mask")
    return pixels


def sr_pixels(entry: ControlEntry) -> torch.Tensor:
    """The super-resolution input for the Stage C encoder: RGB cropped (centred) to multiples of 32, in [-1, 1]
    (ComfyUI VAE.encode: vae_encode_crop_pixels, then the Stage C coder's process_input x * 2 - 1)."""
    from . import images

    pixels = images.to_tensor(entry.image, "ControlNet image")
    h, w = pixels.shape[-2:]
    h32, w32 = h // 32 * 32, w // 32 * 32
    if min(h32, w32) < 32:
        raise CascadeError(f"the super-resolution ControlNet image is {w}x{h}; it needs at least 32x32 pixels")
    top, left = (h % 32) // 2, (w % 32) // 2
    return pixels[:, :, top:top + h32, left:left + w32] * 2.0 - 1.0


def fit_hint(hint: torch.Tensor, latent_hw: tuple[int, int], backbone: str, c_in: int) -> torch.Tensor:
    """ComfyUI T2IAdapter: centre-crop resize to `hint_size`, then the channel mean for a 1-channel ControlNet."""
    from .images import common_upscale

    height, width = hint_size(latent_hw, backbone)
    hint = common_upscale(hint.float(), width, height, HINT[backbone][1], "center")
    if c_in == 1 and hint.shape[1] > 1:
        hint = hint.mean(1, keepdim=True)
    if hint.shape[1] != c_in:
        raise CascadeError(f"the ControlNet takes {c_in} input channels, its hint has {hint.shape[1]}")
    return hint


def canny_edges(image, low: float = CANNY_THRESHOLDS[0], high: float = CANNY_THRESHOLDS[1]):
    """A canny edge map (PIL "L", white edges) of a PIL image: ComfyUI's Canny node, whose kornia.filters.canny
    does grey (0.299, 0.587, 0.114) -> 5x5 Gaussian, sigma 1 (reflect) -> Sobel gradients (replicate) -> magnitude
    and direction in 45-degree steps -> non-maximum suppression -> low/high thresholds -> hysteresis (8-connected).
    Written here in torch (no kornia/cv2 dependency)."""
    from PIL import Image

    from . import images

    if not (0 < low <= high < 1):
        raise CascadeError(f"canny thresholds {low:g}, {high:g}: need 0 < low <= high < 1")
    edges = canny_tensor(images.to_tensor(image, "canny image"), low, high)
    return Image.fromarray((edges[0, 0].numpy() * 255).round().astype(np.uint8), mode="L")


def images_tensor(image) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] of a PIL image (cascade.images.to_tensor)."""
    from . import images

    return images.to_tensor(image, "canny image")


def canny_tensor(rgb: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) edges in {0, 1} (see `canny_edges`)."""
    grey = (rgb[:, 0:1] * 0.299 + rgb[:, 1:2] * 0.587 + rgb[:, 2:3] * 0.114).float()
    g = torch.exp(-(torch.arange(5, dtype=torch.float32) - 2) ** 2 / 2.0)
    g = g / g.sum()
    blurred = F.pad(grey, (2, 2, 2, 2), mode="reflect")
    blurred = F.conv2d(F.conv2d(blurred, g.view(1, 1, 1, 5)), g.view(1, 1, 5, 1))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(blurred, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel_x.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel_x.t().contiguous().view(1, 1, 3, 3))
    magnitude = torch.sqrt(gx * gx + gy * gy + 1e-6)
    direction = torch.round(torch.rad2deg(torch.atan2(gy, gx)) / 45.0).long() % 8  # 0..7, 45-degree steps
    # Neighbour offsets (dy, dx) along each direction; a pixel is kept if it beats both neighbours on its line.
    offsets = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]
    padded_mag = F.pad(magnitude, (1, 1, 1, 1))
    h, w = magnitude.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded_mag[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for d, (dy, dx) in enumerate(offsets):
        forward, backward = shifted(dy, dx), shifted(-dy, -dx)
        keep |= (direction == d) & (magnitude > forward) & (magnitude > backward)
    magnitude = magnitude * keep
    strong = magnitude > high
    weak = (magnitude > low) & ~strong
    edges = strong.float()
    kernel = torch.ones(1, 1, 3, 3)
    while True:  # hysteresis: weak pixels touching an edge become edges, until nothing changes
        grown = ((F.conv2d(edges, kernel, padding=1) > 0) & weak) | strong
        grown = grown.float()
        if torch.equal(grown, edges):
            return edges
        edges = grown


# --- conditioning ------------------------------------------------------------------------------------------------


@dataclass
class ActiveControl:
    """One ControlNet's residuals (fp32, batch 1, x strength) and its sigma window."""

    residuals: list[torch.Tensor | None]
    sigma_start: float
    sigma_end: float

    def active(self, sigma: float) -> bool:
        return not (sigma > self.sigma_start or sigma < self.sigma_end)


def window(start: float, end: float, shift: float) -> tuple[float, float]:
    """(sigma at start, sigma at end) by ComfyUI's percent_to_sigma on the Stage C schedule."""
    from .sampling import NoiseSchedule

    schedule = NoiseSchedule(shift)
    return schedule.percent_to_sigma(start), schedule.percent_to_sigma(end)


def residuals(model: nn.Module, hint: torch.Tensor, strength: float) -> list[torch.Tensor | None]:
    """The ControlNet's per-ResBlock outputs for `hint`, in fp32, times `strength` (ComfyUI control_merge)."""
    weight = next(model.parameters())
    out = model(hint.to(weight.device, weight.dtype))
    return [None if r is None else r.float() * strength for r in out]


class ControlSchedule:
    """control(sigma) -> the summed residuals of the ControlNets active at sigma, or None (none active)."""

    def __init__(self, controls: list[ActiveControl]):
        self.controls = controls
        self.calls: list[tuple[float, int]] = []  # (sigma, how many were active): what tests and infotext read

    def __call__(self, sigma: float) -> list[torch.Tensor | None] | None:
        active = [c for c in self.controls if c.active(sigma)]
        self.calls.append((sigma, len(active)))
        if not active:
            return None
        total: list[torch.Tensor | None] = []
        for control in active:
            for i, r in enumerate(control.residuals):
                if i >= len(total):
                    total.append(r)
                elif r is not None:
                    total[i] = r if total[i] is None else total[i] + r
        return total


def expand(control: list[torch.Tensor | None], batch: int) -> list[torch.Tensor | None]:
    """The batch-1 residuals broadcast to `batch` (the hint is the same for every image, as ComfyUI broadcasts it)."""
    return [None if r is None else r.expand(batch, *r.shape[1:]) for r in control]


def build_schedule(entries: Sequence[Any], prior: nn.Module, latent_hw: tuple[int, int], shift: float,
                   device: torch.device, encode_sr: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   loaded: Callable[[ControlNetFile], nn.Module] | None = None) -> ControlSchedule | None:
    """Scan, check, load and run each ControlNet of a request once; None when there is nothing to apply.

    Entries of strength 0 are skipped entirely (ControlNetApplyAdvanced). `encode_sr(pixels in [-1, 1])` gives
    the Stage C encoder's latent for a super-resolution ControlNet. Each ControlNet is on `device` only while it
    runs, unless `loaded` hands out a kept module.
    """
    controls = []
    for item in entries:
        entry = as_entry(item)
        if entry.strength == 0:
            continue
        cnet = scan_controlnet(entry.path)
        check_fits(cnet, prior.config)
        if cnet.backbone == "large":
            if encode_sr is None:
                raise CascadeError("the super-resolution ControlNet needs the Stage C encoder")
            hint = encode_sr(sr_pixels(entry)).float().cpu()
        else:
            hint = pixel_hint(entry, cnet.config["c_in"])
        hint = fit_hint(hint, latent_hw, cnet.backbone, cnet.config["c_in"])
        model = loaded(cnet) if loaded is not None else load_controlnet(cnet, device)
        with torch.inference_mode():
            out = residuals(model, hint, float(entry.strength))
        if loaded is None:
            del model
        start, end = window(entry.start, entry.end, shift)
        controls.append(ActiveControl([None if r is None else r.to(device) for r in out], start, end))
        log.info("ControlNet %s (%s), strength %g, %g-%g", cnet.path.name, cnet.kind, entry.strength, entry.start,
                 entry.end)
    return ControlSchedule(controls) if controls else None


def require_parts(pipe, request) -> None:
    """Before any work (headers only): every file a Stage C ControlNet that fits this prior, a prior that takes
    residuals, and the Stage C encoder when a super-resolution ControlNet needs it."""
    from .side_parts import EFFNET

    entries = [as_entry(e) for e in request.controlnets if as_entry(e).strength != 0]
    if entries and not hasattr(pipe.prior, "_control_hooks"):
        raise CascadeError("this backend's Stage C model takes no ControlNet residuals (a compiled model); use a "
                           "torch device for --controlnet")
    for entry in entries:
        cnet = scan_controlnet(entry.path)
        check_fits(cnet, pipe.prior.config)
        if cnet.backbone == "large" and not pipe.side.has(EFFNET):
            raise CascadeError(f"{printable(cnet.path.name)} (super-resolution) encodes its image with the Stage C "
                               "encoder: pass --stage-c-encoder effnet_encoder.safetensors or use the ComfyUI main file")


def schedule_for(pipe, request) -> ControlSchedule | None:
    """The request's ControlSchedule for this pipeline (Stage C latent size and shift, its device and encoder)."""
    from .side_parts import EFFNET

    def encode_sr(pixels: torch.Tensor) -> torch.Tensor:
        with pipe.side.on_device(EFFNET) as encoder:
            weight = next(encoder.parameters())
            return encoder(pixels.to(weight.device, weight.dtype))

    latent_hw = tuple(request.prior_latent_shape()[2:])
    return build_schedule(request.controlnets, pipe.prior, latent_hw, request.prior.shift, pipe.device, encode_sr)


# --- memory ------------------------------------------------------------------------------------------------------


def planner_extras(request, prior_itemsize: int = 2) -> dict[str, int]:
    """Bytes a request's ControlNets add to the Stage C phase (they run at its start, one after another, each on
    the device only while it runs): the largest fp32 weights + traced activation peak, plus every ControlNet's
    residuals, kept for all steps."""
    from .memtrace import peak_activation_bytes
    from .models.controlnet import StageCControlNet

    entries = [as_entry(e) for e in request.controlnets if as_entry(e).strength != 0]
    if not entries:
        return {}
    latent_hw = tuple(request.prior_latent_shape()[2:])
    run_peak, kept = 0, 0
    for entry in entries:
        cnet = scan_controlnet(entry.path)
        with torch.device("meta"):
            model = StageCControlNet(cnet.config).eval()
            hint = torch.zeros(1, cnet.config["c_in"], *hint_size(latent_hw, cnet.backbone))
            act = peak_activation_bytes(lambda: model(hint))
        run_peak = max(run_peak, cnet.nbytes + act)
        # the outputs are resized to the latent in the UNet; kept at the backbone's 1/32 (or 1x) size, which is it
        kept += len(cnet.config["proj_blocks"]) * cnet.config["c_proj"] * latent_hw[0] * latent_hw[1] * 4
    return {"prior": run_peak + kept}


# --- command line and infotext -----------------------------------------------------------------------------------

SPEC = "FILE:IMAGE[:STRENGTH[:START:END]]"


def _split_colons(text: str) -> list[str]:
    """Split on ':' but keep Windows drive letters (`C:\\...`, `C:/...`) with their path."""
    tokens, out = text.split(":"), []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if len(token) == 1 and token.isalpha() and i + 1 < len(tokens) and tokens[i + 1][:1] in ("\\", "/"):
            token, i = token + ":" + tokens[i + 1], i + 1
        out.append(token)
        i += 1
    return out


def parse_spec(text: str) -> tuple[str, str, str | None, float, float, float, tuple[float, float] | None]:
    """`--controlnet` text -> (file, image path, mask path or None, strength, start, end, canny thresholds or None).

    IMAGE is `PATH`, `PATH,MASK` (inpainting; mask white = repaint) or `canny=PATH` / `canny@LOW,HIGH=PATH`
    (edges computed from a photo). Raises InvalidRequestError naming the part that is wrong."""
    from .errors import InvalidRequestError

    def bad(why: str) -> InvalidRequestError:
        return InvalidRequestError(f"--controlnet {text!r}: {why}; the form is {SPEC}, IMAGE = PATH, PATH,MASK, "
                                   "canny=PATH or canny@LOW,HIGH=PATH")

    parts = _split_colons(text)
    if len(parts) not in (2, 3, 5) or not parts[0] or not parts[1]:
        raise bad("expected a file, an image and optionally STRENGTH or STRENGTH:START:END")
    try:
        numbers = [float(p) for p in parts[2:]]
    except ValueError:
        raise bad(f"{', '.join(parts[2:])} is not a number") from None
    strength, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers):])[:3] if numbers else (1.0, 0.0, 1.0)
    image, canny = parts[1], None
    if image.startswith("canny=") or image.startswith("canny@"):
        head, _, image = image.partition("=")
        canny = CANNY_THRESHOLDS
        if head != "canny":
            try:
                low, high = (float(v) for v in head[len("canny@"):].split(","))
            except ValueError:
                raise bad(f"{head!r}: canny thresholds are canny@LOW,HIGH, e.g. canny@0.4,0.8") from None
            canny = (low, high)
        if not image:
            raise bad("canny= needs an image path")
    image, _, mask = image.partition(",")
    return parts[0], image, mask or None, strength, start, end, canny


def entry_from_spec(text: str) -> ControlEntry:
    """A ControlEntry from `--controlnet` text: images opened and checked, canny edges computed, the file's header
    classified (a wrong file fails here, before anything loads)."""
    from .images import load_image

    path, image, mask, strength, start, end, canny = parse_spec(text)
    scan_controlnet(path)
    picture = load_image(image, f"ControlNet image {Path(image).name}")
    if canny is not None:
        picture = canny_edges(picture, *canny)
    mask_image = load_image(mask, f"ControlNet mask {Path(mask).name}") if mask else None
    return ControlEntry(path, picture, strength, start, end, mask_image)


SR_COMPRESSION = 32.0  # ComfyUI StableCascade_SuperResolutionControlnet: Stage C latent = input // 16 = output // 32


def super_resolution_size(entries: Sequence[Any]) -> tuple[int, int] | None:
    """(width, height) of the 2x output for the first super-resolution ControlNet's image, as ComfyUI's
    StableCascade_SuperResolutionControlnet makes it (Stage B latent input // 2, so the image doubles), with the
    input cropped to multiples of 64 so the output is a multiple of 128; None without such a ControlNet."""
    for item in entries:
        entry = as_entry(item)
        if scan_controlnet(entry.path).kind != "super-resolution":
            continue
        width, height = entry.image.size
        if min(width, height) < 64:
            raise CascadeError(f"the super-resolution ControlNet image is {width}x{height}; it needs at least 64x64 "
                               "pixels (the output is twice its size, in multiples of 128)")
        return 2 * (width // 64 * 64), 2 * (height // 64 * 64)
    return None


def infotext_value(entries: Sequence[Any]) -> str:
    """The infotext "ControlNet" field: `name strength start-end` per ControlNet, `; ` between them."""
    out = []
    for item in entries:
        e = as_entry(item)
        out.append(f"{Path(e.path).stem} {e.strength:g} {e.start:g}-{e.end:g}")
    return "; ".join(out)
