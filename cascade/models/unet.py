"""diffusers' StableCascadeUNet with the timestep-ratio embedding computed in float32.

diffusers' pipelines cast the timestep ratio r to the model dtype before embedding it, which quantises r*10000
(bf16 turns 0.9803 into 9792 instead of 9803). ComfyUI and the original code embed r in fp32 and cast the
embedding. This subclass does the same; everything else is diffusers' code, so SD.Next's offload, quantisation and
attention hooks see a normal StableCascadeUNet.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import StableCascadeUNet
from diffusers.models.unets.unet_stable_cascade import SDCascadeResBlock


class CascadeUNet(StableCascadeUNet):
    """StableCascadeUNet whose sinusoidal r-embedding is computed in fp32 and then cast to the weights' dtype."""

    def get_timestep_ratio_embedding(self, timestep_ratio: torch.Tensor, max_positions: int = 10000) -> torch.Tensor:
        emb = super().get_timestep_ratio_embedding(timestep_ratio.float(), max_positions)
        return emb.to(self.clip_txt_pooled_mapper.weight.dtype)

    def forward(self, *args, control: Sequence[torch.Tensor | None] | None = None, **kwargs):
        """diffusers' forward, plus ControlNet residuals (`control[i]` is added before the i-th ResBlock call).

        diffusers' port dropped the original `cnet` input; this restores it the way the original code and ComfyUI
        (comfy/ldm/cascade/stage_c.py) apply it: ResBlock calls are counted over the down then the up path, and the
        residual for a call is resized (bilinear, align_corners) to the block's input, cast to its dtype and added,
        in the up path after the skip-size fix-up. Calls past the end of `control` (and None entries) get nothing.
        """
        if not control:
            return super().forward(*args, **kwargs)
        with self._control_hooks(list(control)):
            return super().forward(*args, **kwargs)

    @contextlib.contextmanager
    def _control_hooks(self, control: list):
        calls = [0]

        def add(module, inputs):
            index, calls[0] = calls[0], calls[0] + 1
            residual = control[index] if index < len(control) else None
            if residual is None:
                return None
            x = inputs[0]
            x = x + F.interpolate(residual, size=x.shape[-2:], mode="bilinear", align_corners=True).to(x.dtype)
            return (x, *inputs[1:])

        blocks = [b for level in (*self.down_blocks, *self.up_blocks) for b in level if isinstance(b, SDCascadeResBlock)]
        handles = [b.register_forward_pre_hook(add) for b in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
