"""Feature fusion: the stage-2 condition from the input latent and its stage-1 reconstruction."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Fusion(nn.Module):
    """Convs over [z, z_rec1, z - z_rec1] at latent resolution -> N x cond_channels x h x w."""

    def __init__(self, latent_channels: int, cond_channels: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3 * latent_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, cond_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, z_rec1: torch.Tensor) -> torch.Tensor:
        """z, z_rec1: N x 4 x h x w scaled latents -> cond: N x cond_channels x h x w."""
        h = F.silu(self.conv1(torch.cat([z, z_rec1, z - z_rec1], dim=1)))
        h = F.silu(self.conv2(h))
        return self.conv_out(h)
