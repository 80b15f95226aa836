"""Shared decoder (paper §3.2, protocol §6): ASPP then two convs to 2-channel logits at 1/8."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from simprop.model.encoder import FEATURE_CHANNELS

ASPP_CHANNELS = 256
ASPP_DILATIONS = (6, 12, 18)
NUM_CLASSES = 2  # background, foreground


class ASPP(nn.Module):
    """Image pooling, 1x1 and 3x3 convs with dilation 6/12/18, concatenated (5 x 256 = 1280)."""

    def __init__(self, in_channels: int, channels: int = ASPP_CHANNELS, dilations: tuple[int, ...] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.image_pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))]
            + [
                nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=d, dilation=d), nn.ReLU(inplace=True))
                for d in dilations
            ]
        )
        self.out_channels = channels * (len(dilations) + 2)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.image_pooling(x).expand(-1, -1, *x.shape[2:])
        return torch.cat([pooled] + [branch(x) for branch in self.branches], dim=1)


class Decoder(nn.Module):
    """ASPP -> 1x1 conv to 256, ReLU, Dropout2d -> 1x1 conv to 2 logits (linear)."""

    def __init__(self, in_channels: int = FEATURE_CHANNELS, channels: int = ASPP_CHANNELS, num_classes: int = NUM_CLASSES, dropout: float = 0.5) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels)
        self.project = nn.Sequential(nn.Conv2d(self.aspp.out_channels, channels, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.project(self.aspp(x)))
