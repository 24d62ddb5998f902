"""Stage A: the Paella VQGAN (f4) that turns Stage B latents into pixels.

diffusers moved `PaellaVQModel` into `pipelines.deprecated` in 0.38 and may drop it; this is a small
reimplementation with the same module layout (so the same state-dict keys and the same `config.scale_factor` /
`decode()` surface SD.Next's VQGAN decode path uses). Tests check it against diffusers' class where available.
Architecture: reference §1.1 / §2.4 (MixingResidualBlock = LayerNorm -> depthwise 3x3 conv and LayerNorm ->
channel MLP, each gated by learned scalars).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class MixingResidualBlock(nn.Module):
    """Depthwise-conv and channel-MLP residual branches, each modulated by two of six learned scalars."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(channels, channels, kernel_size=3, groups=channels))
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(channels, embed_dim), nn.GELU(), nn.Linear(embed_dim, channels))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class Codebook(nn.Module):
    """The VQ codebook; kept so files load strictly (decode runs unquantised, as ComfyUI and diffusers do)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class PaellaVQModel(ModelMixin, ConfigMixin):
    """Paella VQ-VAE with diffusers' PaellaVQModel config names and state-dict layout."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_down_scale_factor: int = 2,
        levels: int = 2,
        bottleneck_blocks: int = 12,
        embed_dim: int = 384,
        latent_channels: int = 4,
        num_vq_embeddings: int = 8192,
        scale_factor: float = 0.3764,
    ):
        super().__init__()
        widths = [embed_dim // (2**i) for i in reversed(range(levels))]
        self.in_block = nn.Sequential(
            nn.PixelUnshuffle(up_down_scale_factor),
            nn.Conv2d(in_channels * up_down_scale_factor**2, widths[0], kernel_size=1),
        )
        down: list[nn.Module] = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2d(widths[i - 1], widths[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(widths[i], widths[i] * 4))
        down.append(nn.Sequential(nn.Conv2d(widths[-1], latent_channels, kernel_size=1, bias=False), nn.BatchNorm2d(latent_channels)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = Codebook(num_vq_embeddings, latent_channels)

        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(latent_channels, widths[-1], kernel_size=1))]
        for i in range(levels):
            width = widths[levels - 1 - i]
            for _ in range(bottleneck_blocks if i == 0 else 1):
                up.append(MixingResidualBlock(width, width * 4))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(width, widths[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(
            nn.Conv2d(widths[0], out_channels * up_down_scale_factor**2, kernel_size=1),
            nn.PixelShuffle(up_down_scale_factor),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> unquantised latents (Stage B's model space is latents / 0.43)."""
        return self.down_blocks(self.in_block(x))

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = True, return_dict: bool = True):
        """Latents (already multiplied by the Stage A scale) -> pixels, roughly in [0, 1]."""
        sample = self.out_block(self.up_blocks(latents))
        return DecoderOutput(sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(sample)).sample
