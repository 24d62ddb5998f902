"""Stage C's image coder: the EfficientNet encoder (img2img into the 16-channel latent) and the previewer.

Both follow ComfyUI's comfy/ldm/cascade/stage_c_coder.py (`EfficientNetEncoder`, `Previewer`), with the same
module layout, so the state-dict keys are the ones in the files: `backbone.*`, `mapper.*` (Stability's
effnet_encoder.safetensors, ComfyUI's `vae.encoder.*`) and `blocks.*` (previewer.safetensors, `vae.previewer.*`).

The backbone is torchvision's `efficientnet_v2_s().features` (torchvision/models/efficientnet.py: Conv2dNormActivation,
FusedMBConv, MBConv with SqueezeExcitation, BatchNorm eps 1e-3, SiLU), rebuilt here from a stage table so the engine
needs no torchvision and the tiny test model can use the same keys at a few channels. Stochastic depth and dropout are
training-only and omitted (identity in eval mode).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# torchvision _efficientnet_conf("efficientnet_v2_s"): (block, expand_ratio, kernel, stride, in, out, layers)
EFFNET_V2_S: dict[str, Any] = {
    "stages": [
        ["fused", 1, 3, 1, 24, 24, 2],
        ["fused", 4, 3, 2, 24, 48, 4],
        ["fused", 4, 3, 2, 48, 64, 4],
        ["mb", 4, 3, 2, 64, 128, 6],
        ["mb", 6, 3, 1, 128, 160, 9],
        ["mb", 6, 3, 2, 160, 256, 15],
    ],
    "last_channel": 1280,
    "latent_channels": 16,
}
PREVIEWER: dict[str, Any] = {"c_in": 16, "c_hidden": 512, "c_out": 3}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ComfyUI EfficientNetEncoder.mean / .std
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNSCALE = 32  # pixels per latent position (ComfyUI VAE.downscale_ratio for the Stage C coder)
PREVIEW_UPSCALE = 8  # previewer output pixels per latent position


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision models/_utils.py `_make_divisible` (channel rounding of expanded widths)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def conv_norm_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """torchvision Conv2dNormActivation with BatchNorm2d(eps=1e-3) (EfficientNetV2) and SiLU: keys 0 (conv), 1 (bn)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=1e-3),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision ops.SqueezeExcitation with SiLU inside and a sigmoid gate (keys fc1, fc2)."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = torch.sigmoid(self.fc2(F.silu(self.fc1(scale))))
        return scale * x


class MBConv(nn.Module):
    """torchvision MBConv: [1x1 expand] -> depthwise -> squeeze-excitation -> 1x1 project, residual when shapes allow."""

    def __init__(self, expand: float, kernel: int, stride: int, cin: int, cout: int):
        super().__init__()
        self.residual = stride == 1 and cin == cout
        wide = make_divisible(cin * expand)
        layers: list[nn.Module] = []
        if wide != cin:
            layers.append(conv_norm_act(cin, wide, 1))
        layers += [
            conv_norm_act(wide, wide, kernel, stride, groups=wide),
            SqueezeExcitation(wide, max(1, cin // 4)),
            conv_norm_act(wide, cout, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class FusedMBConv(nn.Module):
    """torchvision FusedMBConv: a full kxk conv (expanding, then a 1x1 projection) instead of depthwise + SE."""

    def __init__(self, expand: float, kernel: int, stride: int, cin: int, cout: int):
        super().__init__()
        self.residual = stride == 1 and cin == cout
        wide = make_divisible(cin * expand)
        if wide != cin:
            layers = [conv_norm_act(cin, wide, kernel, stride), conv_norm_act(wide, cout, 1, act=False)]
        else:
            layers = [conv_norm_act(cin, cout, kernel, stride)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


def efficientnet_features(config: dict[str, Any]) -> nn.Sequential:
    """torchvision EfficientNet(...).features: stem (stride 2), one Sequential per stage, last 1x1 conv."""
    stages = config["stages"]
    layers: list[nn.Module] = [conv_norm_act(3, stages[0][4], 3, 2)]
    for kind, expand, kernel, stride, cin, cout, count in stages:
        block = FusedMBConv if kind == "fused" else MBConv
        layers.append(nn.Sequential(*[block(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout)
                                      for i in range(count)]))
    layers.append(conv_norm_act(stages[-1][5], config["last_channel"], 1))
    return nn.Sequential(*layers)


class StageCEncoder(nn.Module):
    """ComfyUI EfficientNetEncoder: images in [-1, 1] (ComfyUI's VAE `process_input`) -> the Stage C latent at 1/32.

    forward: x*0.5+0.5 back to [0, 1], ImageNet normalisation with `mean`/`std`, backbone, 1x1 conv to 16 channels and
    a BatchNorm without affine ("normalize them to have mean 0 and std 1"). `mean`/`std` are buffers holding
    ComfyUI's defaults; a file that stores them (ComfyUI saves them as parameters) overrides them on load.
    """

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.config = dict(config or EFFNET_V2_S)
        self.backbone = efficientnet_features(self.config)
        latent = self.config["latent_channels"]
        self.mapper = nn.Sequential(
            nn.Conv2d(self.config["last_channel"], latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(latent, affine=False),
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 0.5 + 0.5
        x = (x - self.mean.view(3, 1, 1)) / self.std.view(3, 1, 1)
        return self.mapper(self.backbone(x))


class Previewer(nn.Module):
    """ComfyUI Previewer: Stage C latent (16 ch) -> RGB at 8x, returned in [-1, 1] as ComfyUI's VAE decode expects.

    Layer order (indices are the file keys): conv 1x1, GELU, BN; conv 3x3, GELU, BN; then three (transposed 2x2
    stride-2 conv, GELU, BN, conv 3x3, GELU, BN) upsamplings; a final 1x1 conv. Output `(blocks(x) - 0.5) * 2`.
    """

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.config = dict(config or PREVIEWER)
        c_in, hidden, c_out = self.config["c_in"], self.config["c_hidden"], self.config["c_out"]
        widths = [hidden, hidden // 2, hidden // 4, hidden // 4]
        layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, 1), nn.GELU(), nn.BatchNorm2d(hidden),
                                   nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(), nn.BatchNorm2d(hidden)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 2, stride=2), nn.GELU(), nn.BatchNorm2d(cout),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GELU(), nn.BatchNorm2d(cout)]
        layers.append(nn.Conv2d(widths[-1], c_out, 1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.blocks(x) - 0.5) * 2.0


def previewer_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The previewer's widths read from its first and last conv (keys without prefix)."""
    first, last = shapes["blocks.0.weight"], shapes["blocks.24.weight"]
    return {"c_in": first[1], "c_hidden": first[0], "c_out": last[0]}


def is_effnet_v2_s(shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether encoder tensors (keys without prefix) are the official EfficientNetV2-S + 1280->16 mapper."""
    return (shapes.get("backbone.0.0.weight") == (24, 3, 3, 3)
            and shapes.get("backbone.7.0.weight") == (1280, 256, 1, 1)
            and shapes.get("mapper.0.weight") == (16, 1280, 1, 1)
            and "backbone.6.14.block.0.0.weight" in shapes and "backbone.6.15.block.0.0.weight" not in shapes)
