"""The embedded tiny model: random weights, real architectures, real file layouts.

Used by `python -m cascade generate` when no checkpoints are given and by the tests. Every component is built
from a small config with the real classes (StableCascadeUNet, CLIPTextModelWithProjection, Paella VQ), seeded, and
written in the layouts people actually download: ComfyUI all-in-one Stage C and Stage B files, Stability's bare
files, kohya/OneTrainer text-encoder side files, a bare stage_a.safetensors, and diffusers folders. The tiny
widths match no official variant, so each file carries its configs in the safetensors metadata
(`cascade.config.<part>`), which `cascade.checkpoints` reads only when the shapes are unknown.

This module is the project's fixtures: the writers and the inverse key maps (`unet_keys_for_layout`, model names ->
a layout's file names) exist for the tests, benchmarks and the demo only; loading real files never uses them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Iterable
from pathlib import Path

import torch
from torch import nn

from . import configs
from .checkpoints import CLIP_VISION, DECODER, EFFNET, METADATA_CONFIG, PREVIEWER, PRIOR, STAGE_A, TEXT_ENCODER
from .tensorfile import write_safetensors

FORMAT_VERSION = "2"  # bump when the tiny configs or layouts change, so caches are rebuilt

TINY_PRIOR = {
    **configs.PRIOR,
    "conditioning_dim": 64,
    "block_out_channels": [64, 64],
    "num_attention_heads": [2, 2],
    "down_num_layers_per_block": [1, 2],
    "up_num_layers_per_block": [2, 1],
    "clip_text_in_channels": 32,
    "clip_text_pooled_in_channels": 32,
}
TINY_DECODER = {
    **configs.DECODER,
    "conditioning_dim": 64,
    "block_out_channels": [16, 32, 64, 64],
    "num_attention_heads": [0, 0, 2, 2],
    "down_num_layers_per_block": [1, 1, 1, 1],
    "up_num_layers_per_block": [1, 1, 1, 1],
    "up_blocks_repeat_mappers": [2, 2, 1, 1],
    "clip_text_pooled_in_channels": 32,
}
TINY_TEXT_ENCODER = {
    **configs.CLIP_G,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
TINY_STAGE_A = {**configs.STAGE_A, "embed_dim": 32, "bottleneck_blocks": 1}
# The parts only some requests load (cascade.side_parts), with the real key layouts at a few channels: an
# EfficientNetV2 of one block per stage (still /32), a 16-wide previewer, a 2-layer CLIP vision tower at 56 px whose
# projection matches the prior's clip_img width.
TINY_EFFNET = {
    "stages": [["fused", 1, 3, 1, 8, 8, 1], ["fused", 4, 3, 2, 8, 16, 1], ["fused", 4, 3, 2, 16, 16, 1],
               ["mb", 4, 3, 2, 16, 24, 1], ["mb", 6, 3, 1, 24, 24, 2], ["mb", 6, 3, 2, 24, 32, 1]],
    "last_channel": 32,
    "latent_channels": 16,
}
TINY_PREVIEWER = {"c_in": 16, "c_hidden": 16, "c_out": 3}
TINY_CLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": TINY_PRIOR["clip_image_in_channels"],
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_channels": 3,
    "image_size": 56,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
TINY_CONFIGS = {PRIOR: TINY_PRIOR, DECODER: TINY_DECODER, TEXT_ENCODER: TINY_TEXT_ENCODER, STAGE_A: TINY_STAGE_A,
                EFFNET: TINY_EFFNET, PREVIEWER: TINY_PREVIEWER, CLIP_VISION: TINY_CLIP_VISION}


@dataclass
class TinyModels:
    """The four components with deterministic random weights, in our models' own (diffusers/HF) key names."""

    prior: nn.Module
    decoder: nn.Module
    text_encoder: nn.Module
    stage_a: nn.Module
    side: dict[str, nn.Module] | None = None  # effnet / previewer / clip_vision; built on first use if None

    def side_models(self) -> dict[str, nn.Module]:
        if self.side is None:
            self.side = build_tiny_side_models()
        return self.side

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            PRIOR: self.prior.state_dict(),
            DECODER: self.decoder.state_dict(),
            TEXT_ENCODER: self.text_encoder.state_dict(),
            STAGE_A: self.stage_a.state_dict(),
        }


def build_tiny_models(seed: int = 0) -> TinyModels:
    """Instantiate the tiny configs with seeded weights; zero-initialised gains get small random values too."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .models import CascadeUNet, PaellaVQModel

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        models = TinyModels(
            prior=CascadeUNet.from_config(TINY_PRIOR),
            decoder=CascadeUNet.from_config(TINY_DECODER),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_ENCODER)),
            stage_a=PaellaVQModel.from_config(TINY_STAGE_A),
        )
        for module in (models.prior, models.decoder, models.stage_a):
            for name, p in module.named_parameters():
                if name.endswith(("gamma", "beta", "gammas")):
                    with torch.no_grad():
                        p.normal_(0.0, 0.1)
        for module in (models.prior, models.decoder, models.text_encoder, models.stage_a):
            module.eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(gen_state)
    models.side = build_tiny_side_models(seed)
    return models


def build_tiny_side_models(seed: int = 0) -> dict[str, nn.Module]:
    """The tiny encoder, previewer and CLIP vision, seeded. Random BatchNorm statistics would wash the image out of
    a random network, so every BatchNorm gets the statistics of its input over a fixed batch of smooth random
    pictures (previewer: random latents), as a trained network has: the encoder's latents then vary with the image
    and have about zero mean and unit variance ("normalize them to have mean 0 and std 1", ComfyUI
    stage_c_coder.py)."""
    from .models.clip_vision import build_clip_vision
    from .models.stage_c_coder import Previewer, StageCEncoder

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed + 1000)
    try:
        side = {EFFNET: StageCEncoder(TINY_EFFNET), PREVIEWER: Previewer(TINY_PREVIEWER),
                CLIP_VISION: build_clip_vision(TINY_CLIP_VISION)}
        gen = torch.Generator().manual_seed(seed)
        pictures = torch.nn.functional.interpolate(torch.rand(16, 3, 6, 6, generator=gen), size=(128, 128),
                                                   mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
        latents = torch.randn(16, TINY_PREVIEWER["c_in"], 8, 8, generator=gen)
        for module, batch in ((side[EFFNET], pictures), (side[PREVIEWER], latents)):
            norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # cumulative: one pass gives the batch statistics
            module.train()
            with torch.no_grad():
                module(batch)
            for norm in norms:
                norm.momentum = 0.1
        for module in side.values():
            module.eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(gen_state)
    return side


def _side_tensors(models: TinyModels, kind: str, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A side part's tensors under `prefix`; the encoder's mean/std included as ComfyUI saves them (parameters)."""
    module = models.side_models()[kind]
    state = dict(module.state_dict())
    if kind == EFFNET:
        state |= {"mean": module.mean, "std": module.std}
    return {prefix + k: (t.to(dtype) if t.is_floating_point() else t) for k, t in state.items()
            if not k.endswith("position_ids")}


def _metadata(*kinds: str) -> dict[str, str]:
    meta = {"cascade.tiny": "random weights, for tests and demos", "cascade.tiny.version": FORMAT_VERSION}
    for kind in kinds:
        meta[METADATA_CONFIG + kind] = json.dumps(TINY_CONFIGS[kind])
    return meta


def _unet_tensors(state: dict[str, torch.Tensor], layout: str, stage: str, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for file_key, members in unet_keys_for_layout(state.keys(), layout, stage).items():
        tensors = [state[model_key] for model_key, _ in members]
        t = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
        out[prefix + file_key] = t.to(dtype)
    return out


def _text_encoder_tensors(state: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype, projection: str) -> dict[str, torch.Tensor]:
    """CLIP tensors under `prefix`; projection 'linear' (`...transformer.text_projection.weight`) or 'bare'."""
    out = {}
    for key, t in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight" and projection == "bare":
            bare = prefix[: -len("transformer.")] + "text_projection"
            out[bare] = t.t().contiguous().to(dtype)
            continue
        out[prefix + key] = t.to(dtype)
    if prefix.endswith("transformer."):
        out[prefix[: -len("transformer.")] + "logit_scale"] = torch.tensor(4.6052, dtype=dtype)
    return out


def _stage_a_tensors(state: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype, original_names: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        if original_names and key == "vquantizer.embedding.weight":
            key = "vquantizer.codebook.weight"
        out[prefix + key] = t.to(dtype) if t.is_floating_point() else t
    return out


def write_comfyui_stage_c(path: Path, models: TinyModels, *, dtype=torch.float16, projection: str = "bare",
                          extras: bool = True, text_encoder: bool = True, extra_tensors: dict | None = None) -> Path:
    """A ComfyUI all-in-one Stage C file: UNet + CLIG-G (+ Stage C encoder/previewer under `vae.` and CLIP vision
    under `clip_l_vision.`, with `extras`)."""
    sd = models.state_dicts()
    tensors = _unet_tensors(sd[PRIOR], "comfyui", PRIOR, "model.diffusion_model.", dtype)
    kinds = [PRIOR]
    if text_encoder:
        tensors |= _text_encoder_tensors(sd[TEXT_ENCODER], "text_encoder.clip_g.transformer.", dtype, projection)
        kinds.append(TEXT_ENCODER)
    if extras:
        tensors |= _side_tensors(models, EFFNET, "vae.encoder.", dtype)
        tensors |= _side_tensors(models, PREVIEWER, "vae.previewer.", dtype)
        tensors |= _side_tensors(models, CLIP_VISION, "clip_l_vision.", dtype)
        kinds += [EFFNET, PREVIEWER, CLIP_VISION]
    tensors |= extra_tensors or {}
    write_safetensors(path, tensors, _metadata(*kinds))
    return path


def write_comfyui_stage_b(path: Path, models: TinyModels, *, dtype=torch.float16, text_encoder: bool = True) -> Path:
    """A ComfyUI all-in-one Stage B file: UNet (`clip_mapper` naming) + CLIP-G + Stage A under `vae.`."""
    sd = models.state_dicts()
    tensors = _unet_tensors(sd[DECODER], "comfyui", DECODER, "model.diffusion_model.", dtype)
    kinds = [DECODER, STAGE_A]
    if text_encoder:
        tensors |= _text_encoder_tensors(sd[TEXT_ENCODER], "text_encoder.clip_g.transformer.", dtype, "linear")
        kinds.append(TEXT_ENCODER)
    tensors |= _stage_a_tensors(sd[STAGE_A], "vae.", dtype, original_names=True)
    write_safetensors(path, tensors, _metadata(*kinds))
    return path


def write_stability_unet(path: Path, models: TinyModels, stage: str, *, dtype=torch.bfloat16) -> Path:
    """Stability's bare single file (no prefix, attention as stacked in_proj, Stage B `clip_mapper`)."""
    tensors = _unet_tensors(models.state_dicts()[stage], "stability", stage, "", dtype)
    write_safetensors(path, tensors, _metadata(stage))
    return path


def write_side_part_file(path: Path, models: TinyModels, kind: str, *, dtype=torch.float32) -> Path:
    """A side part as its own file: Stability's effnet_encoder.safetensors / previewer.safetensors (bare
    `backbone.*`+`mapper.*` / `blocks.*`, no mean/std) or a Hugging Face CLIPVisionModelWithProjection file."""
    tensors = _side_tensors(models, kind, "", dtype)
    if kind == EFFNET:
        tensors = {k: v for k, v in tensors.items() if k not in ("mean", "std")}
    write_safetensors(path, tensors, _metadata(kind))
    return path


def write_text_encoder_side_file(path: Path, models: TinyModels, *, dtype=torch.float16) -> Path:
    """kohya `<name>_text_model.safetensors` / OneTrainer `<name>_text_encoder.safetensors` (plain HF keys)."""
    tensors = _text_encoder_tensors(models.state_dicts()[TEXT_ENCODER], "", dtype, "linear")
    write_safetensors(path, tensors, _metadata(TEXT_ENCODER))
    return path


def write_stage_a(path: Path, models: TinyModels, *, dtype=torch.float32) -> Path:
    """A bare stage_a.safetensors with the original (`vquantizer.codebook`) names."""
    tensors = _stage_a_tensors(models.state_dicts()[STAGE_A], "", dtype, original_names=True)
    write_safetensors(path, tensors, _metadata(STAGE_A))
    return path


def _write_json(path: Path, data: dict) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2), durable=False)


def write_diffusers_folders(root: Path, models: TinyModels, *, dtype=torch.bfloat16) -> tuple[Path, Path]:
    """Prior and decoder pipeline folders as diffusers saves them (model_index.json + component subfolders)."""
    from .text import TOKENIZER_DIR

    sd = models.state_dicts()
    prior_dir, decoder_dir = root / "prior_pipeline", root / "decoder_pipeline"
    for folder, unet_name, stage in ((prior_dir, "prior", PRIOR), (decoder_dir, "decoder", DECODER)):
        _write_json(folder / unet_name / "config.json", {"_class_name": "StableCascadeUNet", **TINY_CONFIGS[stage]})
        write_safetensors(folder / unet_name / "diffusion_pytorch_model.safetensors",
                          _unet_tensors(sd[stage], "diffusers", stage, "", dtype))
        _write_json(folder / "text_encoder" / "config.json",
                    {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", **TINY_TEXT_ENCODER})
        write_safetensors(folder / "text_encoder" / "model.safetensors", _text_encoder_tensors(sd[TEXT_ENCODER], "", dtype, "linear"))
        shutil.copytree(TOKENIZER_DIR, folder / "tokenizer", dirs_exist_ok=True)
        _write_json(folder / "scheduler" / "scheduler_config.json", {"_class_name": "DDPMWuerstchenScheduler", "s": 0.008, "scaler": 1.0})
    _write_json(prior_dir / "model_index.json", {
        "_class_name": "StableCascadePriorPipeline", "prior": ["diffusers", "StableCascadeUNet"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMWuerstchenScheduler"], "resolution_multiple": 42.67})
    _write_json(decoder_dir / "vqgan" / "config.json", {"_class_name": "PaellaVQModel", **TINY_STAGE_A})
    write_safetensors(decoder_dir / "vqgan" / "diffusion_pytorch_model.safetensors",
                      _stage_a_tensors(sd[STAGE_A], "", dtype, original_names=False))
    _write_json(decoder_dir / "model_index.json", {
        "_class_name": "StableCascadeDecoderPipeline", "decoder": ["diffusers", "StableCascadeUNet"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMWuerstchenScheduler"], "vqgan": ["wuerstchen", "PaellaVQModel"],
        "latent_dim_scale": 10.67})
    return prior_dir, decoder_dir


def ensure_tiny_checkpoints(folder: Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    """The tiny ComfyUI Stage C ('main') and Stage B ('decoder') files, written once and then reused."""
    from .paths import cache_dir

    folder = Path(folder) if folder else cache_dir() / f"tiny-v{FORMAT_VERSION}-seed{seed}"
    prior, decoder = folder / "tiny_cascade_stage_c.safetensors", folder / "tiny_cascade_stage_b.safetensors"
    if prior.is_file() and decoder.is_file():  # each file is published by an atomic rename: complete if present
        return prior, decoder
    from .atomic import file_lock

    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder):  # concurrent first runs: one builds, the others wait and then reuse its files
        if not (prior.is_file() and decoder.is_file()):
            models = build_tiny_models(seed)
            write_comfyui_stage_c(prior, models)
            write_comfyui_stage_b(decoder, models)
    return prior, decoder


# --- the inverse key maps (our model names -> each layout's file names), for writing test files ----------------
QKV = ("to_q", "to_k", "to_v")


def unet_keys_for_layout(model_keys: Iterable[str], layout: str, stage: str) -> dict[str, list[tuple[str, int | None]]]:
    """file key -> [(model key, chunk)] for writing a diffusers-named UNet state dict in `layout`.

    layout: 'diffusers' (as is), 'comfyui' (split attn under `attention.attn.`), 'stability' (stacked in_proj).
    """
    out: dict[str, list[tuple[str, int | None]]] = {}
    for name in model_keys:
        file_name = name
        if layout in ("comfyui", "stability"):
            if stage == "decoder" and name.startswith("clip_txt_pooled_mapper."):
                file_name = "clip_mapper." + name[len("clip_txt_pooled_mapper.") :]
            file_name = file_name.replace(".attention.to_out.0.", ".attention.attn.out_proj.")
            for i, qkv in enumerate(QKV):
                marker = f".attention.{qkv}."
                if marker in file_name:
                    if layout == "stability":
                        head, kind = file_name.split(marker)
                        out.setdefault(f"{head}.attention.attn.in_proj_{kind}", []).append((name, i))
                        file_name = None
                    else:
                        file_name = file_name.replace(marker, f".attention.attn.{qkv}.")
                    break
        if file_name is not None:
            out.setdefault(file_name, []).append((name, None))
    for parts in out.values():
        parts.sort(key=lambda p: -1 if p[1] is None else p[1])
    return out


# --- tiny Stage C ControlNets (cascade.controlnet), Stability's key layout at a few channels -------------------
# proj_blocks index the tiny prior's 6 ResBlock calls (down 0 | 1 2, up 3 4 | 5): both paths, both levels.
TINY_CONTROLNET_BASE = {"c_proj": TINY_PRIOR["block_out_channels"][0], "proj_blocks": [0, 2, 3, 5]}
TINY_CONTROLNETS = {
    "canny": {**TINY_CONTROLNET_BASE, "backbone": "effnet", "c_in": 1, "embed": TINY_EFFNET["last_channel"],
              "effnet": TINY_EFFNET},
    "inpainting": {**TINY_CONTROLNET_BASE, "backbone": "effnet", "c_in": 4, "embed": TINY_EFFNET["last_channel"],
                   "effnet": TINY_EFFNET},
    "super-resolution": {**TINY_CONTROLNET_BASE, "backbone": "large", "c_in": 16, "embed": 16, "hidden": 32,
                         "width": 8, "res_blocks": 8},
}


def build_tiny_controlnet(kind: str, seed: int = 0) -> nn.Module:
    """A tiny ControlNet of `kind` (canny, inpainting, super-resolution) with seeded weights, in eval mode."""
    from .models.controlnet import StageCControlNet

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed + 2000)
    try:
        config = TINY_CONTROLNETS[kind]
        model = StageCControlNet(config)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if norms:  # as build_tiny_side_models: BatchNorm statistics of smooth random hints, not of nothing
            gen = torch.Generator().manual_seed(seed)
            hints = torch.nn.functional.interpolate(torch.rand(8, config["c_in"], 6, 6, generator=gen),
                                                    size=(128, 128), mode="bicubic", align_corners=False).clamp(0, 1)
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None
            model.train()
            with torch.no_grad():
                model(hints)
            for norm in norms:
                norm.momentum = 0.1
        model.eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def write_tiny_controlnet(path: Path, kind: str, seed: int = 0, *, dtype=torch.float32) -> Path:
    """A tiny ControlNet file as Stability publishes them (bare `backbone.*`/`projections.*` keys), config in the
    metadata (`cascade.config.controlnet`)."""
    state = build_tiny_controlnet(kind, seed).state_dict()
    tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in state.items()}
    meta = {"cascade.tiny": "random weights, for tests and demos", "cascade.tiny.version": FORMAT_VERSION,
            METADATA_CONFIG + "controlnet": json.dumps(TINY_CONTROLNETS[kind])}
    write_safetensors(path, tensors, meta)
    return path
