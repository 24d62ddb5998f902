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

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from . import configs
from .errors import CheckpointError, CorruptFileError, HeaderError, MissingComponentError, NotStableCascadeError
from .tensorfile import SafetensorsHeader, parse_strict_json, printable, read_header, refuse_pickle

PRIOR, DECODER, TEXT_ENCODER, STAGE_A = "prior", "decoder", "text_encoder", "stage_a"
EFFNET, PREVIEWER, CLIP_VISION = "effnet", "previewer", "clip_vision"
CONTROLNET = "controlnet"  # Stability's Stage C ControlNets (cascade.controlnet)

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
    "controlnet": "Stage C ControlNet",
}
PART_TITLES = {
    PRIOR: "Stage C UNet",
    DECODER: "Stage B UNet",
    TEXT_ENCODER: "CLIP-G text encoder",
    STAGE_A: "Stage A (VQGAN)",
    EFFNET: "Stage C EfficientNet encoder",
    PREVIEWER: "Stage C previewer",
    CLIP_VISION: "CLIP-L vision encoder",
    CONTROLNET: "Stage C ControlNet",
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


def metadata_config(header: SafetensorsHeader, kind: str,
                    problem: Callable[[Any], str | None] | None = None) -> dict[str, Any] | None:
    """The config a file embeds in its metadata for part `kind` (our tiny test files do), or None; validated like
    any input, since it decides what gets built: strict JSON, then `problem(config)` (default: the checks of
    `cascade.configs.config_problem`). Any fault raises HeaderError naming the metadata key."""
    key = METADATA_CONFIG + kind
    raw = header.metadata.get(key)
    if not raw:
        return None
    where = f"{printable(header.path.name)}: the config in its metadata ({key})"
    advice = "The file was not written by this engine or was edited; remove that metadata entry or rebuild the file."
    try:
        config = parse_strict_json(raw)
    except (ValueError, RecursionError) as err:
        pos = getattr(err, "pos", None)
        reason = "is nested too deeply" if isinstance(err, RecursionError) else f"is not valid JSON ({getattr(err, 'msg', err)})"
        at = f" at character {pos}" if pos is not None else ""
        raise HeaderError(f"{where} {reason}{at}. {advice}", field=key) from None
    reason = problem(config) if problem is not None else configs.config_problem(kind, config, strict=True)
    if reason:
        raise HeaderError(f"{where} is unusable: {reason}. {advice}", field=key)
    return config


def _known_or_custom(part: Part, known: str | None, config: dict[str, Any] | None, problem: str) -> tuple[str, dict[str, Any]]:
    """A known variant's repo config; else the config our tiny test files carry in their metadata; else an error."""
    if known is not None:
        return known, config
    custom = metadata_config(part.headers[0], part.kind)
    if custom is not None:
        return "custom", custom
    raise NotStableCascadeError(f"{printable(part.headers[0].path.name)}: {problem}")


def _unet_variant(part: Part) -> tuple[str, dict[str, Any]]:
    if part.kind == PRIOR:
        shape = part.info(part.prefix + "clip_txt_mapper.weight").shape
        rows = shape[0] if shape else None
        known = {2048: "big", 1536: "lite"}.get(rows)
        what = f"clip_txt_mapper.weight has {rows} rows (2048 = big, 1536 = lite)"
    else:
        key = part.prefix + "down_blocks.1.0.channelwise.0.weight"
        width = part.info(key).shape[-1] if key in part.key_header and part.info(key).shape else None
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
        elif "projections.0.0.weight" in keyset and ("backbone.0.0.weight" in keyset or "backbone.0.weight" in keyset):
            claim(CONTROLNET, "stability", "", bare)  # ComfyUI load_t2i_adapter's marker keys
        elif any(k.startswith("backbone.") for k in bare) and "mapper.0.weight" in keyset:
            claim(EFFNET, "stability", "", bare)
        elif all(k.startswith("blocks.") for k in bare):
            claim(PREVIEWER, "stability", "", bare)
        elif "vision_model.embeddings.class_embedding" in keyset and "visual_projection.weight" in keyset:
            claim(CLIP_VISION, "hf", "", [k for k in bare if k.startswith(("vision_model.", "visual_projection."))])
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
    if has("zero_convs.0.0.weight", "controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight"):
        xl = has("label_emb.", "add_embedding.linear_1.weight")
        return f"a ControlNet for {'SDXL' if xl else 'Stable Diffusion 1.x/2.x'}"
    if any_prefix("body.0.") or any_prefix("adapter.body.") or "conv_in.weight" in keys and has("body.0.block2."):
        return "a T2I-Adapter for Stable Diffusion"
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
    if CONTROLNET in parts:
        return "controlnet"
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
            f"{printable(path.name)} is not a Stable Cascade file: it looks like {looks_like(set(header.keys()))}. "
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


MAX_JSON_FILE = 16 * 1024 * 1024  # index and config files of real diffusers folders are a few hundred KB


def _json_file(path: Path) -> Any:
    """A JSON file of a diffusers folder (shard index, config), parsed strictly and size-bounded."""
    label = f"{printable(path.parent.name)}/{printable(path.name)}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_FILE + 1)
    except OSError as err:
        raise CheckpointError(f"{label}: cannot be read ({err.strerror or err}). Check its permissions.") from None
    if len(raw) > MAX_JSON_FILE:
        raise CorruptFileError(f"{label}: over {MAX_JSON_FILE >> 20} MiB, far larger than any diffusers index or config "
                               "file; the folder is damaged. Download it again.")
    try:
        return parse_strict_json(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        reason = f"invalid UTF-8 at byte {err.start}"
    except RecursionError:
        reason = "JSON nested too deeply"
    except ValueError as err:
        pos = getattr(err, "pos", None)
        reason = f"invalid JSON ({getattr(err, 'msg', err)}" + (f" at character {pos})" if pos is not None else ")")
    raise CorruptFileError(f"{label}: {reason}. The folder is damaged; download it again.")


def _within(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _hf_blobs(real_folder: Path) -> Path | None:
    """The blob store of a Hugging Face cache snapshot holding `real_folder`: its files are symlinks into
    `<repo>/blobs/` (models--org--name/snapshots/<rev>/...), which is where SD.Next keeps diffusers folders."""
    parts = real_folder.parts
    if "snapshots" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("snapshots")
    return Path(*parts[:at]) / "blobs" if at > 0 else None


def _shard_path(folder: Path, index: Path, name: Any) -> Path:
    """The shard `name` of a shard index, refused unless it stays inside `folder`: no absolute path, no `..`, no
    symbolic link leading elsewhere (except a Hugging Face cache snapshot's links into its own blob store)."""
    label = f"{printable(folder.name)}/{printable(index.name)}"

    def refuse(why: str) -> CorruptFileError:
        return CorruptFileError(f"{label}: the shard {printable(repr(name), 120)} {why}; shards must be files inside "
                                f"{printable(str(folder), 300)}. The index is damaged or hostile; download the folder again.")

    if not isinstance(name, str) or not name or "\x00" in name:
        raise refuse("is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or "\\" in name or name[1:2] == ":" or ".." in pure.parts:
        raise refuse("is outside the folder")
    path = folder.joinpath(*pure.parts)
    real_folder = folder.resolve()
    target = path.resolve()
    if not (_within(target, real_folder) or _within(target, _hf_blobs(real_folder))):
        raise refuse("leads outside the folder through a symbolic link")
    if not path.is_file():
        raise MissingComponentError(f"{label}: the shard {printable(name, 120)} is missing from "
                                    f"{printable(str(folder), 300)}. Download the missing file.")
    return path


def _index_shards(folder: Path, index: Path) -> list[Path]:
    data = _json_file(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptFileError(f"{printable(folder.name)}/{printable(index.name)}: not a shard index (expected "
                               '{"weight_map": {"<tensor>": "<shard file>"}}). Download the folder again.')
    odd = next((n for n in weight_map.values() if not isinstance(n, str)), None)
    if odd is not None:
        _shard_path(folder, index, odd)  # raises: not a file name
    return [_shard_path(folder, index, n) for n in sorted(set(weight_map.values()))]


def _component_files(folder: Path) -> list[Path]:
    """The safetensors weights of one diffusers component folder: plain, a variant (bf16/fp16), or shards."""
    for stem in _WEIGHT_NAMES:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _index_shards(folder, index)
        for variant in ("", ".bf16", ".fp16"):
            f = folder / f"{stem}{variant}.safetensors"
            if f.is_file():
                return [f]
            idx = folder / f"{stem}.safetensors.index{variant}.json"
            if idx.is_file():
                return _index_shards(folder, idx)
    pickles = [p for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    if pickles:
        refuse_pickle(pickles[0])
    raise MissingComponentError(f"{printable(str(folder), 300)}: no .safetensors weights found in this diffusers "
                                "component folder.")


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
        raw = _json_file(config_file)
        config = {k: v for k, v in raw.items() if not k.startswith("_")} if isinstance(raw, dict) else raw
        problem = configs.config_problem(kind, config, strict=False)
        if problem:
            raise CorruptFileError(f"{printable(folder.name)}/config.json: not a usable {PART_TITLES[kind]} config: "
                                   f"{problem}. The folder is damaged; download it again.")
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
            f"{printable(str(path), 300)}: not a Stable Cascade diffusers folder (expected subfolders prior/ or decoder/, text_encoder/, "
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
        f"{printable(checkpoint.path.name)} is a {checkpoint.title}, but {flag} needs a {ROLE_TITLES[role]}.{hint}"
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
    "metadata_config",
    "printable",
    "require",
    "scan",
    "side_text_encoder_files",
]
