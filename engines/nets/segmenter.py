"""Segmenter: anomaly map from an image and its two-stage reconstruction (frozen features + U-Net head)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from engines.nets.backbone import Backbone

PRIOR = 0.05  # initial anomaly probability of every pixel


def _conv_act(in_ch: int, out_ch: int, k: int = 3) -> nn.Sequential:
    """Conv + BatchNorm + ReLU (BN folds into the conv at export)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


class Segmenter(nn.Module):
    """Per-scale fusion of [f(x), f(x_rec), |f(x) - f(x_rec)|] at strides 2..16, a U-Net decoder with
    skips back to full resolution, plus |x - x_rec| at full resolution; logits at strides 8, 4, 2, 1.
    """

    def __init__(self, image_size: int, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.backbone = Backbone(image_size)
        feat = self.backbone.channels
        self.fuse = nn.ModuleList(_conv_act(3 * f, c, 1) for f, c in zip(feat, channels, strict=True))
        c2, c4, c8, c16 = channels
        self.bottom = _conv_act(c16, c16)
        self.dec8 = _conv_act(c16 + c8, c8)
        self.dec4 = _conv_act(c8 + c4, c4)
        self.dec2 = _conv_act(c4 + c2, c2)
        self.dec1 = _conv_act(c2 + 3, c2)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in (c8, c4, c2, c2))
        for head in self.heads:  # start from "almost surely normal" (p = 0.05), the focal-loss prior trick
            nn.init.constant_(head.bias, -math.log((1.0 - PRIOR) / PRIOR))

    def logits(self, x: torch.Tensor, x_rec: torch.Tensor) -> list[torch.Tensor]:
        """x, x_rec: N x 3 x S x S in [0, 1] -> logits N x 1 x s x s at s = S/8, S/4, S/2, S."""
        n = x.shape[0]
        feats = self.backbone(torch.cat([x, x_rec], dim=0))
        fused = [f(torch.cat([a[:n], a[n:], (a[:n] - a[n:]).abs()], dim=1))
                 for f, a in zip(self.fuse, feats, strict=True)]
        f2, f4, f8, f16 = fused
        h = self.bottom(f16)
        outs = []
        for dec, skip in ((self.dec8, f8), (self.dec4, f4), (self.dec2, f2), (self.dec1, (x - x_rec).abs())):
            h = dec(torch.cat([F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False), skip], 1))
            outs.append(h)
        return [head(h) for head, h in zip(self.heads, outs, strict=True)]

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """x, x_rec: N x 3 x S x S in [0, 1] -> anomaly maps N x S x S in [0, 1]."""
        return torch.sigmoid(self.logits(x, x_rec)[-1][:, 0])
