"""Stability's Stage C ControlNet: a feature backbone and one projection per Stage C ResBlock it feeds.

Definition (Stability-AI/StableCascade modules/controlnet.py `ControlNet`, and ComfyUI
comfy/ldm/cascade/controlnet.py, which loads the same files), rebuilt here from a config so the engine needs no
torchvision and the tiny test model uses the same keys at a few channels:

- backbone "effnet" (canny c_in=1, inpainting c_in=4): torchvision `efficientnet_v2_s().features` (our
  `stage_c_coder.efficientnet_features`) whose stem conv is replaced, for c_in != 3, by
  `Conv2d(c_in, 24, 3, stride=2, bias=False)` -- note: *no padding*, unlike torchvision's stem. Keys `backbone.*`,
  output 1280 channels at 1/32.
- backbone "large" (super-resolution, c_in=16 effnet latents): `Conv2d(c_in, 16384, 1)`, LeakyReLU(0.2),
  `Conv2d(16384, 1024, 1)`, 8 x CNetResBlock(1024), `Conv2d(1024, 1280, 1)`. CNetResBlock = x + (LayerNorm2d,
  GELU, conv3x3, LayerNorm2d, GELU, conv3x3) with `nn.LayerNorm(c)` defaults (affine, eps 1e-5), keys
  `backbone.{3..10}.blocks.{0,2,3,5}.*`.
- `projections.{i}`: Conv1x1(1280->1280, no bias), LeakyReLU(0.2), Conv1x1(1280->c_proj=2048, no bias).

`forward(hint)` returns a list indexed by Stage C ResBlock position (0..max(proj_blocks)); positions without a
projection are None. ComfyUI's loader (comfy/controlnet.py `load_t2i_adapter`) uses proj_blocks
[0, 4, 8, 12, 51, 55, 59, 63] for every Stable Cascade ControlNet; the files do not store it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .stage_c_coder import EFFNET_V2_S, efficientnet_features

PROJ_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)  # ComfyUI load_t2i_adapter, for both backbone types
EMBED_CHANNELS = 1280
LARGE = {"hidden": 4096 * 4, "width": 1024, "res_blocks": 8}


def official_config(backbone: str, c_in: int) -> dict[str, Any]:
    """The released files' config for a backbone type and input width."""
    config: dict[str, Any] = {"backbone": backbone, "c_in": c_in, "c_proj": 2048, "embed": EMBED_CHANNELS,
                              "proj_blocks": list(PROJ_BLOCKS)}
    if backbone == "effnet":
        config["effnet"] = dict(EFFNET_V2_S)
    else:
        config |= {k: v for k, v in LARGE.items()}
    return config


class LayerNorm2d(nn.LayerNorm):
    """nn.LayerNorm over the channels of an NCHW tensor (affine, eps 1e-5 as the definition's default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNetResBlock(nn.Module):
    """x + (LN2d, GELU, conv3x3, LN2d, GELU, conv3x3)(x); submodule indices are the file keys `blocks.N`."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.Sequential(LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1),
                                    LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


def _backbone(config: dict[str, Any]) -> nn.Sequential:
    c_in, embed = config["c_in"], config["embed"]
    if config["backbone"] == "effnet":
        features = efficientnet_features(config["effnet"])
        if c_in != 3:
            stem_out = config["effnet"]["stages"][0][4]
            features[0][0] = nn.Conv2d(c_in, stem_out, kernel_size=3, stride=2, bias=False)
        return features
    width = config["width"]
    return nn.Sequential(nn.Conv2d(c_in, config["hidden"], 1), nn.LeakyReLU(0.2), nn.Conv2d(config["hidden"], width, 1),
                         *[CNetResBlock(width) for _ in range(config["res_blocks"])], nn.Conv2d(width, embed, 1))


class StageCControlNet(nn.Module):
    """The ControlNet of `config` (see `official_config`); `forward(hint)` -> per-ResBlock residuals or None."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.proj_blocks = tuple(int(i) for i in config["proj_blocks"])
        self.backbone = _backbone(config)
        embed, c_proj = config["embed"], config["c_proj"]
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(embed, embed, 1, bias=False), nn.LeakyReLU(0.2), nn.Conv2d(embed, c_proj, 1, bias=False))
            for _ in self.proj_blocks)

    @property
    def input_channels(self) -> int:
        return int(self.config["c_in"])

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor | None]:
        features = self.backbone(hint)
        out: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for index, projection in zip(self.proj_blocks, self.projections):
            out[index] = projection(features)
        return out
