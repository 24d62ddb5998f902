"""Model configurations held in the repo, so nothing is ever fetched from the hub.

The four StableCascadeUNet configs are the diffusers ones (reference §2.1); CLIP-G is the bigG-14 text tower
(§2.3); Stage A is diffusers' PaellaVQModel default (§2.4). Tiny configs for tests live in `cascade.tiny`.
"""

from __future__ import annotations

import copy
from typing import Any

_RES_TIME_ATTN = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")
_RES_TIME = ("SDCascadeResBlock", "SDCascadeTimestepBlock")

PRIOR: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "timestep_ratio_embedding_dim": 64,
    "patch_size": 1,
    "conditioning_dim": 2048,
    "block_out_channels": [2048, 2048],
    "num_attention_heads": [32, 32],
    "down_num_layers_per_block": [8, 24],
    "up_num_layers_per_block": [24, 8],
    "down_blocks_repeat_mappers": [1, 1],
    "up_blocks_repeat_mappers": [1, 1],
    "block_types_per_layer": [list(_RES_TIME_ATTN), list(_RES_TIME_ATTN)],
    "clip_text_in_channels": 1280,
    "clip_text_pooled_in_channels": 1280,
    "clip_image_in_channels": 768,
    "clip_seq": 4,
    "effnet_in_channels": None,
    "pixel_mapper_in_channels": None,
    "kernel_size": 3,
    "dropout": [0.1, 0.1],
    "self_attn": True,
    "timestep_conditioning_type": ["sca", "crp"],
    "switch_level": [False],
}

PRIOR_LITE: dict[str, Any] = {
    **PRIOR,
    "conditioning_dim": 1536,
    "block_out_channels": [1536, 1536],
    "num_attention_heads": [24, 24],
    "down_num_layers_per_block": [4, 12],
    "up_num_layers_per_block": [12, 4],
}

DECODER: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "timestep_ratio_embedding_dim": 64,
    "patch_size": 2,
    "conditioning_dim": 1280,
    "block_out_channels": [320, 640, 1280, 1280],
    "num_attention_heads": [0, 0, 20, 20],
    "down_num_layers_per_block": [2, 6, 28, 6],
    "up_num_layers_per_block": [6, 28, 6, 2],
    "down_blocks_repeat_mappers": [1, 1, 1, 1],
    "up_blocks_repeat_mappers": [3, 3, 2, 2],
    "block_types_per_layer": [list(_RES_TIME), list(_RES_TIME), list(_RES_TIME_ATTN), list(_RES_TIME_ATTN)],
    "clip_text_in_channels": None,
    "clip_text_pooled_in_channels": 1280,
    "clip_image_in_channels": None,
    "clip_seq": 4,
    "effnet_in_channels": 16,
    "pixel_mapper_in_channels": 3,
    "kernel_size": 3,
    "dropout": [0, 0, 0.1, 0.1],
    "self_attn": True,
    "timestep_conditioning_type": ["sca"],
    "switch_level": None,
}

DECODER_LITE: dict[str, Any] = {
    **DECODER,
    "block_out_channels": [320, 576, 1152, 1152],
    "num_attention_heads": [0, 9, 18, 18],
    "down_num_layers_per_block": [2, 4, 14, 4],
    "up_num_layers_per_block": [4, 14, 4, 2],
    "up_blocks_repeat_mappers": [2, 2, 2, 2],
}

# (stage, variant) -> UNet config. Variants are told apart by tensor shapes in `cascade.checkpoints`.
UNET_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("prior", "big"): PRIOR,
    ("prior", "lite"): PRIOR_LITE,
    ("decoder", "big"): DECODER,
    ("decoder", "lite"): DECODER_LITE,
}

CLIP_G: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

STAGE_A: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "up_down_scale_factor": 2,
    "levels": 2,
    "bottleneck_blocks": 12,
    "embed_dim": 384,
    "latent_channels": 4,
    "num_vq_embeddings": 8192,
    "scale_factor": 0.3764,
}


def unet_config(stage: str, variant: str) -> dict[str, Any]:
    """A deep copy of the UNet config for ('prior'|'decoder', 'big'|'lite')."""
    try:
        return copy.deepcopy(UNET_CONFIGS[(stage, variant)])
    except KeyError:
        raise KeyError(f"no built-in config for stage={stage!r} variant={variant!r}") from None


# --- validation of configs that come from files (safetensors metadata, diffusers config.json) ------------------
#
# A config read from a file decides how big a module gets built, so it is input like any other: every field the
# model classes read is checked for type and range here, before anything is built. The bounds are far above every
# real Stable Cascade model (the big prior has 2 levels of 2048 channels and 24 layers) and far below what could
# exhaust memory or time while building a model on the meta device; the loader then checks every tensor size
# against the file header before it allocates anything (`cascade.loader.check_part`).

MAX_CHANNELS = 16384
MAX_LEVELS = 8
MAX_LAYERS = 128
_UNET_BLOCKS = frozenset(_RES_TIME_ATTN)
_TIMESTEP_CONDITIONS = frozenset({"sca", "crp"})  # the only ones the pipeline feeds (reference §3)
_HIDDEN_ACTS = frozenset({"gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"})


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; True is not a channel count


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_problem(value: Any, lo: int, hi: int) -> str | None:
    if not _is_int(value):
        return f"must be an integer, got {_show(value)}"
    if not lo <= value <= hi:
        return f"must be between {lo} and {hi}, got {_show(value)}"
    return None


def _float_problem(value: Any, lo: float, hi: float) -> str | None:
    if type(value) not in (int, float) or value != value or not lo <= value <= hi:
        return f"must be a number between {lo} and {hi}, got {_show(value)}"
    return None


def _list_problem(value: Any, length: int | None, lo: int = 0, hi: int = MAX_LEVELS) -> str | None:
    if not isinstance(value, list):
        return f"must be a list, got {_show(value)}"
    if length is not None and len(value) != length:
        return f"must have one entry per level ({length}), got {len(value)}"
    if not lo <= len(value) <= hi:
        return f"must have {lo} to {hi} entries, got {len(value)}"
    return None


def _first(problems: list[tuple[str, str | None]]) -> str | None:
    for name, problem in problems:
        if problem is not None:
            return f"{name}{'' if problem.startswith('[') else ' '}{problem}"
    return None


def _unet_problem(c: dict[str, Any]) -> str | None:
    ints = {"in_channels": 256, "out_channels": 256, "timestep_ratio_embedding_dim": 4096, "patch_size": 16,
            "conditioning_dim": MAX_CHANNELS, "clip_seq": 256, "kernel_size": 15}
    problem = _first([(k, _int_problem(c.get(k), 1, hi)) for k, hi in ints.items()])
    if problem:
        return problem
    if c["timestep_ratio_embedding_dim"] % 2 or c["kernel_size"] % 2 == 0:
        return "timestep_ratio_embedding_dim must be even and kernel_size odd"
    for k in ("clip_text_in_channels", "clip_text_pooled_in_channels", "clip_image_in_channels", "effnet_in_channels",
              "pixel_mapper_in_channels"):
        if c.get(k) is not None and (problem := _int_problem(c[k], 1, MAX_CHANNELS)):
            return f"{k} {problem} (or null)"
    widths = c.get("block_out_channels")
    if problem := _list_problem(widths, None, 1, MAX_LEVELS):
        return f"block_out_channels {problem}"
    levels = len(widths)
    lists = {"num_attention_heads": (0, 1024), "down_num_layers_per_block": (0, MAX_LAYERS),
             "up_num_layers_per_block": (0, MAX_LAYERS), "down_blocks_repeat_mappers": (1, 16),
             "up_blocks_repeat_mappers": (1, 16)}
    checks = [("block_out_channels", _first([(f"[{i}]", _int_problem(w, 1, MAX_CHANNELS)) for i, w in enumerate(widths)]))]
    for k, (lo, hi) in lists.items():
        value = c.get(k)
        problem = _list_problem(value, levels) or _first([(f"[{i}]", _int_problem(v, lo, hi)) for i, v in enumerate(value)])
        checks.append((k, problem))
    types = c.get("block_types_per_layer")
    problem = _list_problem(types, levels) or _first([
        (f"[{i}]", _list_problem(t, None, 1, 8) or next((f"has unknown block type {_show(b)}" for b in t
                                                         if not isinstance(b, str) or b not in _UNET_BLOCKS), None))
        for i, t in enumerate(types)])
    checks.append(("block_types_per_layer", problem))
    if problem := _first(checks):
        return problem
    for i, (width, heads, kinds) in enumerate(zip(widths, c["num_attention_heads"], types)):
        if "SDCascadeAttnBlock" in kinds and (heads < 1 or width % heads):
            return f"num_attention_heads[{i}] must divide block_out_channels[{i}] ({width}), got {heads}"
    dropout = c.get("dropout", 0.0)
    dropouts = dropout if isinstance(dropout, list) else [dropout]
    if isinstance(dropout, list) and len(dropout) != levels:
        return f"dropout must have one entry per level ({levels}), got {len(dropout)}"
    if problem := _first([(f"dropout[{i}]", _float_problem(d, 0.0, 1.0)) for i, d in enumerate(dropouts)]):
        return problem
    attn = c.get("self_attn", True)
    if not (isinstance(attn, bool) or (isinstance(attn, list) and len(attn) == levels and all(isinstance(a, bool) for a in attn))):
        return f"self_attn must be true/false or one per level, got {_show(attn)}"
    conds = c.get("timestep_conditioning_type", [])
    if not isinstance(conds, list) or len(conds) > 4 or any(not isinstance(x, str) or x not in _TIMESTEP_CONDITIONS for x in conds):
        return f"timestep_conditioning_type must be a list of {sorted(_TIMESTEP_CONDITIONS)}, got {_show(conds)}"
    switch = c.get("switch_level")
    if switch is not None and not (isinstance(switch, list) and levels - 1 <= len(switch) <= MAX_LEVELS
                                   and all(isinstance(s, bool) for s in switch)):
        return f"switch_level must be null or at least {levels - 1} true/false values, got {_show(switch)}"
    return None


def _text_encoder_problem(c: dict[str, Any]) -> str | None:
    ints = {"vocab_size": (1, 1 << 20), "hidden_size": (1, MAX_CHANNELS), "intermediate_size": (1, 4 * MAX_CHANNELS),
            "projection_dim": (1, MAX_CHANNELS), "num_hidden_layers": (1, MAX_LAYERS), "num_attention_heads": (1, 1024),
            "max_position_embeddings": (1, 4096)}
    problem = _first([(k, _int_problem(c.get(k), lo, hi)) for k, (lo, hi) in ints.items()])
    if problem:
        return problem
    if c["hidden_size"] % c["num_attention_heads"]:
        return f"num_attention_heads ({c['num_attention_heads']}) must divide hidden_size ({c['hidden_size']})"
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in c and c[k] is not None and (problem := _int_problem(c[k], 0, 1 << 20)):
            return f"{k} {problem}"
    if "hidden_act" in c and c["hidden_act"] not in _HIDDEN_ACTS:
        return f"hidden_act must be one of {sorted(_HIDDEN_ACTS)}, got {_show(c['hidden_act'])}"
    if "layer_norm_eps" in c and (problem := _float_problem(c["layer_norm_eps"], 0.0, 1.0)):
        return f"layer_norm_eps {problem}"
    return None


def _stage_a_problem(c: dict[str, Any]) -> str | None:
    ints = {"in_channels": (1, 64), "out_channels": (1, 64), "up_down_scale_factor": (1, 8), "levels": (1, MAX_LEVELS),
            "bottleneck_blocks": (0, MAX_LAYERS), "embed_dim": (1, MAX_CHANNELS), "latent_channels": (1, 1024),
            "num_vq_embeddings": (1, 1 << 20)}
    problem = _first([(k, _int_problem(c.get(k), lo, hi)) for k, (lo, hi) in ints.items()])
    if problem:
        return problem
    if c["embed_dim"] % (1 << (c["levels"] - 1)):
        return f"embed_dim ({c['embed_dim']}) must be divisible by 2**(levels-1) = {1 << (c['levels'] - 1)}"
    if "scale_factor" in c and (problem := _float_problem(c["scale_factor"], 1e-6, 1e6)):
        return f"scale_factor {problem}"
    return None


_KNOWN_KEYS = {"prior": set(PRIOR), "decoder": set(DECODER), "text_encoder": set(CLIP_G), "stage_a": set(STAGE_A)}
_CHECKS = {"prior": _unet_problem, "decoder": _unet_problem, "text_encoder": _text_encoder_problem,
           "stage_a": _stage_a_problem}


def config_problem(kind: str, config: Any, *, strict: bool = True) -> str | None:
    """What is wrong with a config read from a file for part `kind`, or None when it is usable.

    strict: refuse keys the model classes do not know (our own metadata configs); diffusers' and Hugging Face's
    config.json files carry bookkeeping keys of their own, so folder configs are checked without it.
    """
    if kind not in _CHECKS:
        return f"no config is known for a part of kind {kind!r}"
    if not isinstance(config, dict):
        return f"the config must be a JSON object, got {type(config).__name__}"
    if strict:
        unknown = sorted(str(k) for k in config if k not in _KNOWN_KEYS[kind])
        if unknown:
            return f"unknown config key(s) {', '.join(_show(k) for k in unknown[:3])}"
    return _CHECKS[kind](config)
