"""Tell checkpoint files apart by their tensors, never by file name or size.

`scan(path)` reads only headers and returns a `Checkpoint`: the file's role (Stage C, Stage B, Stage A, text
encoder, ...), the parts it holds (UNet, CLIP-G, Stage A, Stage C encoder/previewer, CLIP vision) with their
layout, variant, dtype and size, and the tensors nobody claims. It understands ComfyUI all-in-one files,
Stability's bare single files, kohya/OneTrainer text-encoder side files, a bare Stage A and diffusers folders.

Classification rules (reference §1.2, the same ComfyUI and diffusers use):
- Stage C: `clip_txt_mapper.weight` present; rows 2048 = big, 1536 = lite.
- Stage B: `clip_mapper.weight` (or diffusers' `clip_txt_pooled_mapper.weight` next to `effnet_mapper`);
  `down_blocks.1.0.channelwise.0.weight` width 640 = big, 576 = lite.
Our own tiny test models have other widths; they carry their config in the safetensors metadata
(`cascade.config.<part>`), which is used only when the shapes match no known variant.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import configs
from .errors import CheckpointError, MissingComponentError, NotStableCascadeError
from .tensorfile import SafetensorsHeader, read_header, refuse_pickle

PRIOR, DECODER, TEXT_ENCODER, STAGE_A = "prior", "decoder", "text_encoder", "stage_a"
EFFNET, PREVIEWER, CLIP_VISION = "effnet", "previewer", "clip_vision"

ROLE_OF_PART = {PRIOR: "stage_c", DECODER: "stage_b"}
ROLE_TITLES = {
    "stage_c": "Stage C (prior, the 'main' file)",
    "stage_b": "Stage B (decoder)",
    "stage_a": "Stage A (VQGAN image decoder)",
    "text_encoder": "CLIP-G text encoder",
    "effnet": "Stage C EfficientNet encoder",
    "previewer": "Stage C previewer",
    "clip_vision": "CLIP-L vision encoder",
    "stage_c_extras": "Stage C extras (encoder/previewer)",
}
PART_TITLES = {
    PRIOR: "Stage C UNet",
    DECODER: "Stage B UNet",
    TEXT_ENCODER: "CLIP-G text encoder",
    STAGE_A: "Stage A (VQGAN)",
    EFFNET: "Stage C EfficientNet encoder",
    PREVIEWER: "Stage C previewer",
    CLIP_VISION: "CLIP-L vision encoder",
}

_COMFY_UNET = "model.diffusion_model."
_COMFY_CLIP_G = ("text_encoder.clip_g.", "text_encoders.clip_g.")
_COMFY_VISION = "clip_l_vision."
_COMFY_VAE = "vae."
METADATA_CONFIG = "cascade.config."  # + part kind; only our tiny test models write it


@dataclass
class Part:
    """One component found in a checkpoint: which tensors, in which layout, at which dtype."""

    kind: str
    layout: str
    prefix: str
    keys: list[str]
    headers: list[SafetensorsHeader]
    key_header: dict[str, int]
    variant: str | None = None
    config: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.keys)

    @property
    def numel(self) -> int:
        return sum(self.info(k).numel for k in self.keys)

    @property
    def dtype(self) -> str:
        """The dtype holding most of the part's bytes (a few fp32 norms in an fp16 file do not count)."""
        weights = Counter()
        for k in self.keys:
            info = self.info(k)
            weights[info.dtype] += info.nbytes
        return weights.most_common(1)[0][0] if weights else "?"

    def info(self, key: str):
        return self.headers[self.key_header[key]].tensors[key]


@dataclass
class Checkpoint:
    """What `scan` found in one file or folder."""

    path: Path
    role: str
    parts: dict[str, Part]
    unknown_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    looks_like: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def title(self) -> str:
        return ROLE_TITLES.get(self.role, self.role)

    def unet(self) -> Part | None:
        return self.parts.get(PRIOR) or self.parts.get(DECODER)


def _single(header: SafetensorsHeader, kind: str, layout: str, prefix: str, keys: list[str]) -> Part:
    return Part(kind, layout, prefix, keys, [header], {k: 0 for k in keys})


def _unet_layout(keys: list[str]) -> str:
    if any(".attention.attn.in_proj_" in k for k in keys):
        return "stability"
    if any(".attention.attn." in k for k in keys):
        return "comfyui"
    return "diffusers"


def _unet_stage(header: SafetensorsHeader, prefix: str) -> str | None:
    if prefix + "clip_txt_mapper.weight" in header:
        return PRIOR
    if prefix + "clip_mapper.weight" in header or (
        prefix + "clip_txt_pooled_mapper.weight" in header and prefix + "effnet_mapper.0.weight" in header
    ):
        return DECODER
    return None


def _metadata_config(header: SafetensorsHeader, kind: str) -> dict[str, Any] | None:
    raw = header.metadata.get(METADATA_CONFIG + kind)
    return json.loads(raw) if raw else None


def _known_or_custom(part: Part, known: str | None, config: dict[str, Any] | None, problem: str) -> tuple[str, dict[str, Any]]:
    """A known variant's repo config; else the config our tiny test files carry in their metadata; else an error."""
    if known is not None:
        return known, config
    custom = _metadata_config(part.headers[0], part.kind)
    if custom is not None:
        return "custom", custom
    raise NotStableCascadeError(f"{part.headers[0].path.name}: {problem}")


def _unet_variant(part: Part) -> tuple[str, dict[str, Any]]:
    if part.kind == PRIOR:
        rows = part.info(part.prefix + "clip_txt_mapper.weight").shape[0]
        known = {2048: "big", 1536: "lite"}.get(rows)
        what = f"clip_txt_mapper.weight has {rows} rows (2048 = big, 1536 = lite)"
    else:
        key = part.prefix + "down_blocks.1.0.channelwise.0.weight"
        width = part.info(key).shape[-1] if key in part.key_header else None
        known = {640: "big", 576: "lite"}.get(width)
        what = f"down_blocks.1.0.channelwise.0.weight is {width} wide (640 = big, 576 = lite)"
    return _known_or_custom(
        part, known, configs.unet_config(part.kind, known) if known else None,
        f"looks like a Stable Cascade {PART_TITLES[part.kind]} but of no known size: {what}. "
        "Only the official big and lite architectures (and finetunes of them) are supported.",
    )


def _text_encoder_variant(part: Part) -> tuple[str, dict[str, Any]]:
    emb = part.prefix + "text_model.embeddings.token_embedding.weight"
    shape = part.info(emb).shape if emb in part.key_header else None
    layers = {m.group(1) for k in part.keys if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    is_clip_g = shape == (49408, 1280) and len(layers) == 32
    return _known_or_custom(
        part, "clip-g" if is_clip_g else None, dict(configs.CLIP_G),
        f"the text encoder is not CLIP-G (token embedding {shape}, {len(layers)} layers; Stable Cascade needs the "
        "1280-wide, 32-layer CLIP ViT-bigG/14 text model).",
    )


def _stage_a_variant(part: Part) -> tuple[str, dict[str, Any]]:
    key = part.prefix + "up_blocks.0.0.weight"
    shape = part.info(key).shape if key in part.key_header else None
    return _known_or_custom(
        part, "paella" if shape == (384, 4, 1, 1) else None, dict(configs.STAGE_A),
        f"Stage A of an unknown shape (up_blocks.0.0.weight {shape}).",
    )


def _is_stage_a(keys: set[str], prefix: str) -> bool:
    return prefix + "vquantizer.codebook.weight" in keys or prefix + "vquantizer.embedding.weight" in keys


def _split_header(header: SafetensorsHeader) -> tuple[list[Part], list[str]]:
    """Bucket a header's keys into parts by prefix (all-in-one files) or by marker keys (bare files)."""
    keys = list(header.keys())
    keyset = set(keys)
    parts: list[Part] = []
    claimed: set[str] = set()

    def claim(kind: str, layout: str, prefix: str, members: list[str]) -> None:
        if members:
            parts.append(_single(header, kind, layout, prefix, members))
            claimed.update(members)

    # ComfyUI all-in-one prefixes.
    unet_keys = [k for k in keys if k.startswith(_COMFY_UNET)]
    stage = _unet_stage(header, _COMFY_UNET) if unet_keys else None
    if stage:
        claim(stage, "comfyui", _COMFY_UNET, unet_keys)
    for pre in _COMFY_CLIP_G:
        te = [k for k in keys if k.startswith(pre)]
        claim(TEXT_ENCODER, "comfyui", pre + "transformer.", te)
    claim(CLIP_VISION, "comfyui", _COMFY_VISION, [k for k in keys if k.startswith(_COMFY_VISION)])
    vae = [k for k in keys if k.startswith(_COMFY_VAE)]
    if vae:
        if _is_stage_a(keyset, _COMFY_VAE):
            claim(STAGE_A, "comfyui", _COMFY_VAE, vae)
        else:
            claim(EFFNET, "comfyui", _COMFY_VAE + "encoder.", [k for k in vae if k.startswith("vae.encoder.")])
            claim(PREVIEWER, "comfyui", _COMFY_VAE + "previewer.", [k for k in vae if k.startswith("vae.previewer.")])

    # Bare single files: one component, recognised by marker keys.
    bare = [k for k in keys if k not in claimed and "." in k and not k.startswith(("model.", "text_encoder", "vae.", "clip_l_vision."))]
    if bare and not parts:
        stage = _unet_stage(header, "")
        if stage:
            claim(stage, _unet_layout(bare), "", bare)
        elif "text_model.embeddings.token_embedding.weight" in keyset:
            claim(TEXT_ENCODER, "hf", "", bare)
        elif _is_stage_a(keyset, ""):
            layout = "diffusers" if "vquantizer.embedding.weight" in keyset else "stability"
            claim(STAGE_A, layout, "", bare)
        elif any(k.startswith("backbone.") for k in bare) and "mapper.0.weight" in keyset:
            claim(EFFNET, "stability", "", bare)
        elif all(k.startswith("blocks.") for k in bare):
            claim(PREVIEWER, "stability", "", bare)
    unknown = [k for k in keys if k not in claimed]
    return parts, unknown


def looks_like(keys: set[str]) -> str:
    """A best guess at what a non-Stable-Cascade file is, for the error message."""

    def has(*needles: str) -> bool:
        return any(any(n in k for k in keys) for n in needles)

    def any_prefix(p: str) -> bool:
        return any(k.startswith(p) for k in keys)

    if has("lora_up", "lora_down", "lora_A.", "lora_B.", ".hada_w1", ".lokr_"):
        return "a LoRA/LyCORIS network"
    if has("double_blocks.0.img_attn"):
        return "a FLUX model"
    if has("joint_blocks.0."):
        return "a Stable Diffusion 3 model"
    if has("model.diffusion_model.input_blocks."):
        if has("model.diffusion_model.label_emb.") or any_prefix("conditioner.embedders."):
            return "an SDXL checkpoint"
        if any_prefix("cond_stage_model.model."):
            return "a Stable Diffusion 2.x checkpoint"
        return "a Stable Diffusion 1.x checkpoint"
    if has("down_blocks.0.attentions.0.transformer_blocks."):
        return "a diffusers UNet2DConditionModel (SD 1.x/2.x/XL family)"
    if any_prefix("first_stage_model.") or has("encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1"):
        return "a VAE of the SD/SDXL family"
    if any_prefix("text_model.encoder.layers.") or has("transformer.text_model."):
        return "a CLIP text encoder (not CLIP-G)"
    if any_prefix("vision_model."):
        return "a CLIP vision encoder"
    if has("transformer_blocks.0.attn1."):
        return "a diffusion transformer of another family"
    return f"not a recognised model ({len(keys)} tensors)"


def _role(parts: dict[str, Part]) -> str | None:
    for kind in (PRIOR, DECODER):
        if kind in parts:
            return ROLE_OF_PART[kind]
    if STAGE_A in parts:
        return "stage_a"
    if TEXT_ENCODER in parts:
        return "text_encoder"
    if EFFNET in parts or PREVIEWER in parts:
        return "stage_c_extras"
    if CLIP_VISION in parts:
        return "clip_vision"
    return None


def _resolve_variants(parts: dict[str, Part]) -> None:
    resolvers = {PRIOR: _unet_variant, DECODER: _unet_variant, TEXT_ENCODER: _text_encoder_variant, STAGE_A: _stage_a_variant}
    for kind, part in parts.items():
        if kind in resolvers and part.config is None:
            part.variant, part.config = resolvers[kind](part)


def scan_file(path: Path) -> Checkpoint:
    return checkpoint_from_header(read_header(path))


def checkpoint_from_header(header: SafetensorsHeader) -> Checkpoint:
    """Classify a parsed header (tests build headers of full-size models without writing gigabytes)."""
    path = header.path
    found, unknown = _split_header(header)
    parts: dict[str, Part] = {}
    for part in found:
        parts.setdefault(part.kind, part)
    role = _role(parts)
    foreign_unet = PRIOR not in parts and DECODER not in parts and any(k.startswith(_COMFY_UNET) for k in unknown)
    if role is None or foreign_unet:  # e.g. SD3 all-in-one files also carry `text_encoders.clip_g.`
        raise NotStableCascadeError(
            f"{path.name} is not a Stable Cascade file: it looks like {looks_like(set(header.keys()))}. "
            "Stable Cascade needs a Stage C ('main'/prior) file and a Stage B ('decoder') file."
        )
    _resolve_variants(parts)
    return Checkpoint(path, role, parts, unknown, dict(header.metadata))


# --- diffusers folders ---------------------------------------------------------------------------------------

_FOLDER_PARTS = {  # subfolder -> part kind
    "prior": PRIOR,
    "decoder": DECODER,
    "text_encoder": TEXT_ENCODER,
    "vqgan": STAGE_A,
}
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def _component_files(folder: Path) -> list[Path]:
    """The safetensors weights of one diffusers component folder: plain, a variant (bf16/fp16), or shards."""
    for stem in _WEIGHT_NAMES:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / n for n in names]
        for variant in ("", ".bf16", ".fp16"):
            f = folder / f"{stem}{variant}.safetensors"
            if f.is_file():
                return [f]
            idx = folder / f"{stem}.safetensors.index{variant}.json"
            if idx.is_file():
                names = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
                return [folder / n for n in names]
    pickles = [p for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    if pickles:
        refuse_pickle(pickles[0])
    raise MissingComponentError(f"{folder}: no .safetensors weights found in this diffusers component folder.")


def _scan_component_folder(folder: Path, kind: str) -> Part:
    files = _component_files(folder)
    headers = [read_header(f) for f in files]
    keys, key_header = [], {}
    for i, h in enumerate(headers):
        for k in h.keys():
            keys.append(k)
            key_header[k] = i
    layout = "diffusers" if kind != TEXT_ENCODER else "hf"
    part = Part(kind, layout, "", keys, headers, key_header)
    config_file = folder / "config.json"
    if config_file.is_file():
        config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
        part.variant, part.config = "folder", config
    return part


def scan_folder(path: Path) -> Checkpoint:
    """A diffusers pipeline folder (model_index.json + component subfolders) or a single component folder."""
    parts: dict[str, Part] = {}
    own_kind = _FOLDER_PARTS.get(path.name.removesuffix("_lite"))
    if own_kind and (path / "config.json").is_file():
        parts[own_kind] = _scan_component_folder(path, own_kind)
    else:
        for sub, kind in _FOLDER_PARTS.items():
            for name in (sub, f"{sub}_lite"):
                if (path / name).is_dir() and kind not in parts:
                    parts[kind] = _scan_component_folder(path / name, kind)
    role = _role(parts)
    if role is None:
        raise NotStableCascadeError(
            f"{path}: not a Stable Cascade diffusers folder (expected subfolders prior/ or decoder/, text_encoder/, "
            "vqgan/ with model_index.json)."
        )
    for kind in (PRIOR, DECODER):
        if kind in parts and parts[kind].config is None:
            parts[kind].variant, parts[kind].config = _unet_variant(parts[kind])
    _resolve_variants(parts)
    return Checkpoint(path, role, parts)


def scan(path: str | Path) -> Checkpoint:
    """Classify a checkpoint file or diffusers folder by its tensors. Raises CheckpointError subclasses."""
    path = Path(path).expanduser()
    if path.is_dir():
        return scan_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return scan_file(path)


def side_text_encoder_files(prior_path: Path) -> list[Path]:
    """kohya (`<name>_text_model.safetensors`) and OneTrainer (`<name>_text_encoder.safetensors`) side files."""
    stem = prior_path.stem
    return [prior_path.with_name(f"{stem}_text_model.safetensors"), prior_path.with_name(f"{stem}_text_encoder.safetensors")]


def require(checkpoint: Checkpoint, role: str, flag: str) -> None:
    """Raise WrongStageError/NotStableCascadeError when a file was given for the wrong slot."""
    from .errors import WrongStageError

    if checkpoint.role == role:
        return
    other_flag = {"stage_c": "--prior", "stage_b": "--decoder"}.get(checkpoint.role)
    hint = f" Pass it as {other_flag} instead." if other_flag else ""
    if checkpoint.role == "stage_b" and role == "stage_c":
        hint += " The Stage C file is the one SoteDiffusion calls 'Main' (it holds the prior UNet and CLIP-G)."
    if checkpoint.role == "stage_c" and role == "stage_b":
        hint += " The Stage B file is the one SoteDiffusion calls 'Decoder' (Stage B UNet + Stage A)."
    raise WrongStageError(
        f"{checkpoint.path.name} is a {checkpoint.title}, but {flag} needs a {ROLE_TITLES[role]}.{hint}"
    )


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """A JSON-friendly description, the body of `python -m cascade inspect --json`."""
    return {
        "path": str(checkpoint.path),
        "role": checkpoint.role,
        "title": checkpoint.title,
        "parts": {
            kind: {
                "title": PART_TITLES[kind],
                "layout": p.layout,
                "variant": p.variant,
                "dtype": p.dtype,
                "tensors": len(p.keys),
                "parameters": p.numel,
                "bytes": p.nbytes,
            }
            for kind, p in checkpoint.parts.items()
        },
        "unknown_tensors": checkpoint.unknown_keys,
        "metadata": {k: v for k, v in checkpoint.metadata.items() if not k.startswith(METADATA_CONFIG)},
    }


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Part",
    "describe",
    "looks_like",
    "require",
    "scan",
    "side_text_encoder_files",
]
