"""Latent denoiser: a small conditional U-Net predicting epsilon from (z_t, t, cond)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from tdad.nets.blocks import ResBlock, Upsample, group_norm


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of int64 timesteps t (N) -> N x dim (traceable: no Python on values)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Denoiser(nn.Module):
    """Three-level U-Net (h, h/2, h/4) with time-shifted residual blocks; cond is concatenated to z_t.

    An all-zero cond is the unconditional mode (trained by condition dropout), used by stage 1.
    """

    def __init__(self, latent_channels: int, cond_channels: int, channels: tuple[int, int, int],
                 time_dim: int) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(latent_channels + cond_channels, c0, 3, padding=1)
        self.res_d0 = ResBlock(c0, c0, time_dim)
        self.down0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.res_d1 = ResBlock(c1, c1, time_dim)
        self.down1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.res_mid = ResBlock(c2, c2, time_dim)
        self.up1 = Upsample(c2, c1)
        self.res_u1 = ResBlock(2 * c1, c1, time_dim)
        self.up0 = Upsample(c1, c0)
        self.res_u0 = ResBlock(2 * c0, c0, time_dim)
        self.norm_out = group_norm(c0)
        self.conv_out = nn.Conv2d(c0, latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """z_t: N x 4 x h x w, t: int64 N, cond: N x cond_channels x h x w -> eps: N x 4 x h x w."""
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        h0 = self.res_d0(self.conv_in(torch.cat([z_t, cond], dim=1)), temb)
        h1 = self.res_d1(self.down0(h0), temb)
        h = self.res_mid(self.down1(h1), temb)
        h = self.res_u1(torch.cat([self.up1(h), h1], dim=1), temb)
        h = self.res_u0(torch.cat([self.up0(h), h0], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
