"""diffusers' StableCascadeUNet with the timestep-ratio embedding computed in float32.

diffusers' pipelines cast the timestep ratio r to the model dtype before embedding it, which quantises r*10000
(bf16 turns 0.9803 into 9792 instead of 9803). ComfyUI and the original code embed r in fp32 and cast the
embedding. This subclass does the same; everything else is diffusers' code, so SD.Next's offload, quantisation and
attention hooks see a normal StableCascadeUNet.
"""

from __future__ import annotations

import torch
from diffusers import StableCascadeUNet


class CascadeUNet(StableCascadeUNet):
    """StableCascadeUNet whose sinusoidal r-embedding is computed in fp32 and then cast to the weights' dtype."""

    def get_timestep_ratio_embedding(self, timestep_ratio: torch.Tensor, max_positions: int = 10000) -> torch.Tensor:
        emb = super().get_timestep_ratio_embedding(timestep_ratio.float(), max_positions)
        return emb.to(self.clip_txt_pooled_mapper.weight.dtype)
