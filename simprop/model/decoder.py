"""Shared decoder (paper §3.2, protocol §6): ASPP then two convs to 2-channel logits at 1/8."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simprop.model.encoder import FEATURE_CHANNELS

ASPP_CHANNELS = 256
ASPP_DILATIONS = (6, 12, 18)
NUM_CLASSES = 2  # background, foreground


class DilatedConv2d(nn.Conv2d):
    """A 3x3 "same" convolution (``padding = dilation``) that skips the taps reading only padding.

    With dilation ``d`` the outer taps of a 3x3 kernel read the input ``d`` pixels away; on a
    map of height ``h <= d`` every such read of the top and bottom rows of taps lands in the zero
    padding, so those taps add exactly 0 to every output (and receive exactly 0 gradient).  They
    are dropped: the convolution runs with the kernel's middle row (and/or column) and no padding
    in that direction, which is the same function and the same weight gradient (zero on the
    dropped taps, as before) up to float summation order.  On the default setup's 9 x 9 feature
    maps this turns ASPP's dilation-12 and -18 branches into 1x1 convolutions, faster on the CPU
    (``benchmarks/bench_train_step.py``: docs/performance.md, "The default training step").  Only
    on the CPU: on a GPU these convolutions are bound by kernel launches, and the sliced kernel's
    copy and its gradient's scatter are extra launches, slower on an H200
    (docs/studies/2026-11-27-dilated-conv-gpu.md), so there it calls ``conv2d``.
    At the paper's 41 x 41 no tap is dropped anyway.  Same parameters and state-dict keys as
    ``nn.Conv2d``; ``tests/test_model_fusion.py`` checks values and gradients.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        d = self.dilation[0]
        if x.device.type != "cpu" or d < min(x.shape[-2:]):  # every tap reaches the map somewhere
            return F.conv2d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation)
        rows, pad_h = (slice(1, 2), 0) if d >= x.shape[-2] else (slice(0, 3), d)
        cols, pad_w = (slice(1, 2), 0) if d >= x.shape[-1] else (slice(0, 3), d)
        return F.conv2d(x, self.weight[:, :, rows, cols], self.bias, padding=(pad_h, pad_w), dilation=d)


class ASPP(nn.Module):
    """Image pooling, 1x1 and 3x3 convs with dilation 6/12/18, concatenated (5 x 256 = 1280).

    As the ASPP of CANet's ``one_shot_network.py`` (icoz69/CaNet, ``layer6_0..4``); the
    dilated branches are :class:`DilatedConv2d` (the same convolutions without the taps that
    read only padding on small maps).
    """

    def __init__(self, in_channels: int, channels: int = ASPP_CHANNELS, dilations: tuple[int, ...] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.image_pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))]
            + [
                nn.Sequential(DilatedConv2d(in_channels, channels, d), nn.ReLU(inplace=True))
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
