"""Latent autoencoder: 8x spatial down-sampling to 4 latent channels of about unit std."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tdad.nets.blocks import ResBlock, Upsample, group_norm


class Encoder(nn.Module):
    """Image in [0, 1] (N x 3 x S x S) -> scaled latent (N x latent_channels x S/8 x S/8)."""

    def __init__(self, channels: tuple[int, int, int], latent_channels: int) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.down0 = nn.Conv2d(3, c0, 3, stride=2, padding=1)
        self.down1 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.res1 = ResBlock(c1, c1)
        self.down2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.res2 = ResBlock(c2, c2)
        self.norm_out = group_norm(c2)
        self.conv_out = nn.Conv2d(c2, latent_channels, 3, padding=1)
        # multiplies latents to ~unit std; set from training data after the autoencoder phase
        self.register_buffer("latent_scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x_f32_nchw in [0, 1] -> z (already multiplied by latent_scale)."""
        h = F.silu(self.down0(x * 2.0 - 1.0))
        h = self.res1(self.down1(h))
        h = self.res2(self.down2(h))
        return self.conv_out(F.silu(self.norm_out(h))) * self.latent_scale


class Decoder(nn.Module):
    """Scaled latent (N x latent_channels x S/8 x S/8) -> image in [0, 1] (N x 3 x S x S)."""

    def __init__(self, channels: tuple[int, int, int], latent_channels: int) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.conv_in = nn.Conv2d(latent_channels, c2, 3, padding=1)
        self.res2 = ResBlock(c2, c2)
        self.up1 = Upsample(c2, c1)
        self.res1 = ResBlock(c1, c1)
        self.up0 = Upsample(c1, c0)
        self.norm_out = group_norm(c0)
        self.conv_out = nn.Conv2d(c0, 3 * 4, 3, padding=1)  # 12 channels -> PixelShuffle(2) -> RGB at S
        self.shuffle = nn.PixelShuffle(2)
        self.register_buffer("latent_scale", torch.ones(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (scaled like the Encoder's output) -> x_rec_f32_nchw clamped to [0, 1]."""
        h = self.res2(self.conv_in(z / self.latent_scale))
        h = self.res1(self.up1(h))
        h = F.silu(self.norm_out(self.up0(h)))
        return (self.shuffle(self.conv_out(h)) * 0.5 + 0.5).clamp(0.0, 1.0)
