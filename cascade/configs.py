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
