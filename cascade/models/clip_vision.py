"""CLIP-L vision (image prompts / image variations): transformers' CLIPVisionModelWithProjection.

The ComfyUI main file stores it under `clip_l_vision.` with Hugging Face names (`vision_model.*`,
`visual_projection.weight`), as does Stability's `image_encoder/model.safetensors`. `image_embeds` (the projected,
un-normalised pooled output = visual_projection(post_layernorm(CLS))) is what Stage C's `clip_img` takes; ComfyUI's
comfy/clip_model.py CLIPVisionModelProjection computes the same tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# openai/clip-vit-large-patch14 vision tower (reference §2.4; ComfyUI comfy/clip_vision_config_vitl.json).
CLIP_L_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# ComfyUI comfy/clip_model.py clip_preprocess defaults (OpenAI CLIP normalisation).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip_vision(config: dict[str, Any]) -> nn.Module:
    """A CLIPVisionModelWithProjection for `config` (parameters wherever the caller's context puts them)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A vision config read from the tensors (keys without prefix); heads = hidden / 64 as in every OpenAI CLIP."""
    hidden = shapes["vision_model.embeddings.class_embedding"][0]
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("vision_model.encoder.layers."))
    patch = shapes["vision_model.embeddings.patch_embedding.weight"]
    positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
    grid = round((positions - 1) ** 0.5)
    return {
        **CLIP_L_VISION,
        "hidden_size": hidden,
        "intermediate_size": shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        "projection_dim": shapes["visual_projection.weight"][0],
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "num_channels": patch[1],
        "patch_size": patch[2],
        "image_size": grid * patch[2],
    }


@torch.inference_mode()
def image_embeds(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) preprocessed pixels -> (N, projection) image embeddings in fp32 (ComfyUI `image_embeds`)."""
    dtype = next(model.parameters()).dtype
    out = model(pixel_values=pixel_values.to(dtype))
    return out.image_embeds.float()
