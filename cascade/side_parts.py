"""The parts only some requests need: Stage C's EfficientNet encoder (img2img), its previewer (live previews) and
CLIP-L vision (image prompts). Found from headers when asked, loaded on first use, never before.

Where each comes from, first match wins:
- an explicit side file (`SideFiles`: Stability's effnet_encoder.safetensors / previewer.safetensors, or a Hugging
  Face CLIPVisionModelWithProjection model.safetensors such as stable-cascade-prior's image_encoder/);
- the Stage C file itself (ComfyUI main files carry `vae.encoder.*`, `vae.previewer.*`, `clip_l_vision.*`);
- for the encoder and previewer, Stability's file names next to the Stage C file (effnet_encoder*.safetensors,
  previewer*.safetensors).
A request that needs a part found nowhere gets a MissingComponentError naming the flag that provides it; a missing
previewer is not an error (previews fall back to the latent-to-RGB factors).

Configs: the official shapes are recognised (EfficientNetV2-S, the 512-wide previewer, CLIP ViT-L/14); other
shapes come from the `cascade.config.<part>` metadata our tiny test files carry (the previewer and CLIP vision are
also read from their shapes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoints import CLIP_VISION, EFFNET, METADATA_CONFIG, PART_TITLES, PREVIEWER, Checkpoint, Part, scan
from .errors import MissingComponentError
from .keymaps import KeyMap, Source
from .precision import dtype_for

log = logging.getLogger(__name__)

KINDS = (EFFNET, PREVIEWER, CLIP_VISION)
FLAGS = {EFFNET: "--stage-c-encoder", PREVIEWER: "--previewer", CLIP_VISION: "--clip-vision"}
NEIGHBOUR_NAMES = {EFFNET: "effnet_encoder*.safetensors", PREVIEWER: "previewer*.safetensors"}
# What runs each part: the precision policy (cascade.precision) for the stage whose role it shares (ComfyUI runs the Stage C
# coder as a VAE and CLIP vision at the text encoders' dtype).
DTYPE_STAGE = {EFFNET: "vqgan", PREVIEWER: "vqgan", CLIP_VISION: "text_encoder"}
_EFFNET_NORM = ("mean", "std")  # ComfyUI stores these as parameters; Stability's file has none (defaults apply)

MISSING = {
    EFFNET: "img2img needs the Stage C encoder: pass --stage-c-encoder effnet_encoder.safetensors or use the ComfyUI "
            "main file",
    CLIP_VISION: "image prompts need the CLIP-L vision encoder: pass --clip-vision FILE (a Hugging Face "
                 "CLIPVisionModelWithProjection model.safetensors, e.g. image_encoder/model.safetensors from "
                 "stabilityai/stable-cascade-prior) or use the ComfyUI main file",
    PREVIEWER: "the Stage C previewer was not found: pass --previewer previewer.safetensors or use the ComfyUI main "
               "file (without it previews use the latent-to-RGB factors)",
}

WANTED = {
    EFFNET: "Stability's effnet_encoder.safetensors or a ComfyUI main file",
    PREVIEWER: "Stability's previewer.safetensors or a ComfyUI main file",
    CLIP_VISION: "a Hugging Face CLIPVisionModelWithProjection file (image_encoder/model.safetensors) or a ComfyUI "
                 "main file",
}


@dataclass(frozen=True)
class SideFiles:
    """Explicit side files; None = look in the Stage C file (and next to it)."""

    stage_c_encoder: str | Path | None = None
    previewer: str | Path | None = None
    clip_vision: str | Path | None = None

    def path(self, kind: str) -> Path | None:
        value = {EFFNET: self.stage_c_encoder, PREVIEWER: self.previewer, CLIP_VISION: self.clip_vision}[kind]
        return Path(value).expanduser() if value else None


# --- configs and key maps -----------------------------------------------------------------------------------------


def _shapes(part: Part) -> dict[str, tuple[int, ...]]:
    return {k[len(part.prefix):]: tuple(part.info(k).shape) for k in part.keys}


def resolve_config(part: Part) -> tuple[str, dict[str, Any]]:
    """(variant, config) of a side part from its shapes, else from our metadata; MissingComponentError otherwise."""
    from .models import clip_vision, stage_c_coder

    shapes = _shapes(part)
    raw = part.headers[0].metadata.get(METADATA_CONFIG + part.kind)
    custom = json.loads(raw) if raw else None
    name = part.headers[0].path.name
    try:
        if part.kind == EFFNET:
            if stage_c_coder.is_effnet_v2_s(shapes):
                return "efficientnet_v2_s", dict(stage_c_coder.EFFNET_V2_S)
            if custom is not None:
                return "custom", custom
            raise MissingComponentError(f"{name}: the Stage C encoder tensors are not an EfficientNetV2-S with a "
                                        "1280->16 mapper; use Stability's effnet_encoder.safetensors or the ComfyUI "
                                        "main file")
        if part.kind == PREVIEWER:
            config = stage_c_coder.previewer_config_from_shapes(shapes)
            return ("official" if config == stage_c_coder.PREVIEWER else "custom"), config
        config = custom or clip_vision.config_from_shapes(shapes)
        return ("clip-vit-l-14" if config == clip_vision.CLIP_L_VISION else "custom"), config
    except KeyError as err:
        raise MissingComponentError(f"{name}: the {PART_TITLES[part.kind]} is incomplete (no {err.args[0]}); "
                                    "download the file again") from None


_LIMITS = {"channels": 8192, "layers": 64, "stages": 12}


def _whole(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def config_problem(kind: str, config: Any) -> str | None:
    """What makes a side-part config unusable (it may come from a file's metadata), or None.

    Bounded like cascade.configs' checks: a config decides how much is built, so widths and depths are capped.
    """
    if not isinstance(config, dict):
        return f"the config must be a JSON object, got {type(config).__name__}"
    width = _LIMITS["channels"]
    if kind == EFFNET:
        stages = config.get("stages")
        if not isinstance(stages, list) or not 1 <= len(stages) <= _LIMITS["stages"]:
            return f"`stages` must be a list of 1 to {_LIMITS['stages']} rows"
        for row in stages:
            if not (isinstance(row, list) and len(row) == 7 and row[0] in ("fused", "mb")
                    and isinstance(row[1], (int, float)) and not isinstance(row[1], bool) and 1 <= row[1] <= 16
                    and row[2] in (1, 3, 5, 7) and row[3] in (1, 2) and _whole(row[4], 1, width)
                    and _whole(row[5], 1, width) and _whole(row[6], 1, _LIMITS["layers"])):
                return f"stage row {row!r} is not [fused|mb, expand 1-16, kernel 1/3/5/7, stride 1/2, in, out, layers]"
        if not _whole(config.get("last_channel"), 1, width) or not _whole(config.get("latent_channels"), 1, 256):
            return "`last_channel` and `latent_channels` must be whole numbers in range"
        return None
    if kind == PREVIEWER:
        ok = all(_whole(config.get(k), 1, width) for k in ("c_in", "c_hidden", "c_out"))
        return None if ok and config["c_hidden"] % 4 == 0 else "c_in, c_hidden (a multiple of 4) and c_out must be in range"
    if kind == CLIP_VISION:
        for key, hi in (("hidden_size", width), ("intermediate_size", 4 * width), ("projection_dim", width),
                        ("num_hidden_layers", _LIMITS["layers"]), ("num_attention_heads", 256), ("num_channels", 4),
                        ("image_size", 1024), ("patch_size", 64)):
            if not _whole(config.get(key), 1, hi):
                return f"`{key}` must be a whole number from 1 to {hi}"
        if config["hidden_size"] % config["num_attention_heads"]:
            return "hidden_size must be a multiple of num_attention_heads"
        return None
    return f"not a side part: {kind!r}"


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """An empty side model for `config` (cascade.loader.instantiate calls this under its meta-parameter patch)."""
    from .models import clip_vision, stage_c_coder

    if kind == EFFNET:
        return stage_c_coder.StageCEncoder(config)
    if kind == PREVIEWER:
        return stage_c_coder.Previewer(config)
    if kind == CLIP_VISION:
        return clip_vision.build_clip_vision(config)
    raise ValueError(f"not a side part: {kind!r}")


def keymap(part: Part) -> KeyMap:
    """File keys -> model keys: the prefix stripped (`vae.encoder.`, `vae.previewer.`, `clip_l_vision.` or none);
    the encoder's optional `mean`/`std` are read separately (`load`), CLIP's position_ids and logit_scale dropped."""
    out: KeyMap = {}
    for key in part.keys:
        name = key[len(part.prefix):]
        if (part.kind == EFFNET and name in _EFFNET_NORM) or name.endswith(("position_ids", "logit_scale")):
            continue
        out[name] = Source(key)
    return out


# --- finding ------------------------------------------------------------------------------------------------------


def _from_file(path: Path, kind: str) -> Part:
    from .errors import CascadeError

    if not path.is_file():
        raise MissingComponentError(f"{FLAGS[kind]} {path}: {'not a file' if path.exists() else 'no such file'}; "
                                    f"it needs {WANTED[kind]}")
    try:
        ckpt = scan(path)
    except CascadeError as err:
        raise MissingComponentError(f"{FLAGS[kind]}: {err}") from None
    if kind not in ckpt.parts:
        raise MissingComponentError(f"{path.name} holds no {PART_TITLES[kind]} (it is a {ckpt.title}); "
                                    f"{FLAGS[kind]} needs {WANTED[kind]}")
    return ckpt.parts[kind]


def find_part(kind: str, prior: Checkpoint | None, files: SideFiles, notes: list[str] | None = None) -> Part | None:
    """Where `kind` comes from (headers only), with its config resolved; None when it is nowhere."""
    explicit = files.path(kind)
    part = None
    if explicit is not None:
        part = _from_file(explicit, kind)
        _note(notes, f"{PART_TITLES[kind]} from {explicit.name}")
    elif prior is not None and kind in prior.parts:
        part = prior.parts[kind]
    elif prior is not None and kind in NEIGHBOUR_NAMES and prior.path.is_file():
        for candidate in sorted(prior.path.parent.glob(NEIGHBOUR_NAMES[kind])):
            found = scan(candidate)
            if kind in found.parts:
                part = found.parts[kind]
                _note(notes, f"{PART_TITLES[kind]} from {candidate.name} next to the Stage C file")
                break
    if part is not None and part.config is None:
        part.variant, part.config = resolve_config(part)
    return part


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


def part_bytes(part: Part, dtype: torch.dtype) -> int:
    """Bytes the loaded part takes at `dtype` (floating tensors converted, integer buffers kept), from the header."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for src in keymap(part).values():
        info = part.info(src.key)
        total += info.numel * (itemsize if info.torch_dtype.is_floating_point else info.torch_dtype.itemsize)
    return total


# --- loading ------------------------------------------------------------------------------------------------------


def load(part: Part, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """Load a side part; the encoder's `mean`/`std` come from the file when it stores them (ComfyUI's files do)."""
    from .loader import load_part
    from .tensorfile import TensorReader

    model = load_part(part, dtype=dtype, device=device)
    if part.kind == EFFNET:
        stored = [part.prefix + n for n in _EFFNET_NORM if part.prefix + n in part.key_header]
        if stored:
            header = part.headers[part.key_header[stored[0]]]
            with TensorReader(header) as reader:
                for key in stored:
                    name = key[len(part.prefix):]
                    value = reader.get(key, dtype, device).reshape(-1)
                    if value.shape != getattr(model, name).shape:
                        raise MissingComponentError(f"{header.path.name}: {key} has shape {list(value.shape)}, "
                                                    "expected [3]; download the file again")
                    model._buffers[name] = value
    return model


class SideParts:
    """The side parts of one pipeline: found on first need, loaded on first use, kept on the host between uses
    (or on the device when `keep_on_device`, e.g. a resident plan or a CPU run)."""

    def __init__(self, prior: Checkpoint | None, files: SideFiles | None = None, *, device: torch.device | str = "cpu",
                 dtypes: dict[str, torch.dtype] | None = None, keep_on_device: bool | None = None):
        self.prior = prior
        self.files = files or SideFiles()
        self.device = torch.device(device)
        self.dtypes = {k: torch.float32 for k in KINDS} | (dtypes or {})
        self.keep_on_device = self.device.type == "cpu" if keep_on_device is None else keep_on_device
        self.notes: list[str] = []
        self._parts: dict[str, Part | None] = {}
        self._modules: dict[str, nn.Module] = {}

    @classmethod
    def for_pipeline(cls, sources, files: SideFiles | None, device: torch.device, backend=None,
                     keep_on_device: bool | None = None) -> "SideParts":
        dtypes = {k: dtype_for(backend, DTYPE_STAGE[k]) for k in KINDS} if backend is not None else None
        prior = sources.prior_checkpoint if sources is not None else None
        return cls(prior, files, device=device, dtypes=dtypes, keep_on_device=keep_on_device)

    def part(self, kind: str) -> Part | None:
        if kind not in self._parts:
            self._parts[kind] = find_part(kind, self.prior, self.files, self.notes)
        return self._parts[kind]

    def has(self, kind: str) -> bool:
        return kind in self._modules or self.part(kind) is not None

    def require(self, kind: str) -> None:
        """MissingComponentError (what to pass) unless `kind` can be had; reads headers only."""
        if not self.has(kind):
            raise MissingComponentError(MISSING[kind])

    def check(self) -> None:
        """Scan the explicit side files now (a wrong file fails at open, not in the middle of a request)."""
        for kind in KINDS:
            if self.files.path(kind) is not None:
                self.part(kind)

    def provide(self, kind: str, module: nn.Module) -> None:
        """Use an already built module (hosts that own the weights, tests)."""
        self._modules[kind] = module.eval().requires_grad_(False)

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._modules)

    def module(self, kind: str) -> nn.Module:
        """The part's module, loaded on first call (MissingComponentError when it is nowhere)."""
        if kind not in self._modules:
            self.require(kind)
            part = self.part(kind)
            target = self.device if self.keep_on_device else torch.device("cpu")
            self._modules[kind] = load(part, self.dtypes[kind], target)
            log.info("loaded %s (%s) from %s", PART_TITLES[kind], part.variant, part.headers[0].path.name)
        return self._modules[kind]

    @contextlib.contextmanager
    def on_device(self, kind: str) -> Iterator[nn.Module]:
        """The module on the compute device for the block; back on the host after it unless kept on the device."""
        module = self.module(kind)
        if self.keep_on_device:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    def planner_extras(self, request, stage_a_config: dict[str, Any] | None = None,
                       stage_a_dtype: torch.dtype = torch.float32) -> dict[str, int]:
        """`planner_extras` for this pipeline's parts (header sizes; parts found nowhere count nothing)."""
        kinds = {k for ks in uses(request).values() for k in ks if k != STAGE_A_ENCODE}
        parts = {k: self.part(k) for k in kinds}
        configs = {k: p.config for k, p in parts.items() if p is not None}
        weights = {k: self.nbytes(k) for k in configs}
        dtypes = dict(self.dtypes)
        if stage_a_config is not None:
            configs[STAGE_A_ENCODE], dtypes[STAGE_A_ENCODE] = dict(stage_a_config), stage_a_dtype
        out = planner_extras(request, weights, configs, dtypes)
        if getattr(request, "controlnets", ()):  # Stage C ControlNets (files from the request, not side parts)
            from .controlnet import planner_extras as controlnet_extras

            for phase, n in controlnet_extras(request).items():
                out[phase] = out.get(phase, 0) + n
        return out

    def nbytes(self, kind: str) -> int:
        """Device bytes of a part at its dtype (from the header, or the provided module); 0 when absent."""
        if kind in self._modules:
            return sum(t.numel() * t.element_size() for t in self._modules[kind].state_dict().values())
        part = self.part(kind)
        return part_bytes(part, self.dtypes[kind]) if part is not None else 0


def check_side_files(files: SideFiles) -> None:
    """Headers of the explicit side files, read before any weight loads: a missing or wrong file names its flag."""
    for kind in KINDS:
        path = files.path(kind)
        if path is not None:
            part = _from_file(path, kind)
            if part.config is None:
                part.variant, part.config = resolve_config(part)


# --- memory planning ----------------------------------------------------------------------------------------------

STAGE_A_ENCODE = "stage_a_encode"  # not a part: Stage A's encoder is in the loaded VQGAN; only its activations add


def uses(request) -> dict[str, tuple[str, ...]]:
    """Which side parts a request runs in which planner phase ({} for plain text-to-image)."""
    out: dict[str, tuple[str, ...]] = {}
    text = tuple(k for k, wanted in ((EFFNET, request.image is not None),
                                     (CLIP_VISION, bool(request.image_prompts) and request.image_prompt_strength != 0))
                 if wanted)
    if text:
        out["text_encoder"] = text
    if request.preview_every > 0:
        out["prior"] = (PREVIEWER,)
    if request.decoder_image is not None:
        out["decoder"] = (STAGE_A_ENCODE,)
    return out


def _meta_input(kind: str, config: dict[str, Any], request) -> tuple[int, ...]:
    if kind == EFFNET:
        return (1, 3, int(request.height // request.compression * 32), int(request.width // request.compression * 32))
    if kind == PREVIEWER:
        return (1, config["c_in"], *request.prior_latent_shape()[2:])
    if kind == CLIP_VISION:
        return (1, config["num_channels"], config["image_size"], config["image_size"])
    from .image_inputs import ENCODE_STRIP_PIXELS

    width, height = request.output_size
    rows = min(height // 4, max(1, ENCODE_STRIP_PIXELS // (16 * (width // 4))) + 16)
    return (1, 3, 4 * rows, width)


def activation_bytes(kind: str, config: dict[str, Any], dtype: torch.dtype, input_shape: tuple[int, ...]) -> int:
    """Traced live-activation peak of one call (cascade.memtrace, meta device: no memory, no weights)."""
    return _traced(kind, json.dumps(config, sort_keys=True), dtype, tuple(input_shape))


@functools.lru_cache(maxsize=64)
def _traced(kind: str, config_json: str, dtype: torch.dtype, input_shape: tuple[int, ...]) -> int:
    from .memtrace import peak_activation_bytes

    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == STAGE_A_ENCODE:
            from .models import PaellaVQModel

            model = nn.Module.to(PaellaVQModel.from_config(config), dtype).eval()
            call = model.encode
        else:
            model = build_model(kind, config).to(dtype).eval()
            call = (lambda x: model(pixel_values=x)) if kind == CLIP_VISION else model
        x = torch.zeros(input_shape, dtype=dtype)
        return peak_activation_bytes(lambda: call(x))


def planner_extras(request, weights: dict[str, int], configs: dict[str, dict[str, Any]],
                   dtypes: dict[str, torch.dtype]) -> dict[str, int]:
    """Per planner phase, the bytes a request's side parts add (for `memory.ComponentSizes.extras`).

    `weights`/`configs`/`dtypes` per kind (STAGE_A_ENCODE: the VQGAN's config and dtype, weight 0 since Stage A is
    loaded anyway). Parts of one phase run one after another, so their weights add up (a kept part stays) but only
    the largest activation peak counts.
    """
    out = {}
    for phase, kinds in uses(request).items():
        present = [k for k in kinds if k in configs]
        if present:
            act = max(activation_bytes(k, configs[k], dtypes[k], _meta_input(k, configs[k], request)) for k in present)
            out[phase] = sum(weights.get(k, 0) for k in present) + act
    return out


def full_size_configs() -> dict[str, dict[str, Any]]:
    """The official side parts' configs (and Stage A's, for its encoder's activations)."""
    from . import configs
    from .models import clip_vision, stage_c_coder

    return {EFFNET: dict(stage_c_coder.EFFNET_V2_S), PREVIEWER: dict(stage_c_coder.PREVIEWER),
            CLIP_VISION: dict(clip_vision.CLIP_L_VISION), STAGE_A_ENCODE: dict(configs.STAGE_A)}


@functools.lru_cache(maxsize=16)
def full_size_bytes(kind: str, dtype: torch.dtype) -> int:
    """Weight bytes of an official side part at `dtype`, counted on the meta device (what its file's header says)."""
    with torch.device("meta"):
        model = build_model(kind, full_size_configs()[kind])
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size())
               for t in model.state_dict().values())
