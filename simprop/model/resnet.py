"""ResNet-50 up to ``layer3``, with the module names of torchvision's ``resnet50``.

The frozen encoder needs only the stem and three stages of ResNet-50 (He et al., 2016).
They are defined here instead of being cut out of ``torchvision.models.resnet50`` so that a
stage process does not pay torchvision's import (measured: docs/performance.md, "Measurements
behind code choices").  The parameter and buffer names are torchvision's
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so torchvision
ImageNet state dicts load as they are (``tests/test_model_checkpoint.py`` checks that every
key and shape matches torchvision's).
"""

from __future__ import annotations

from torch import Tensor, nn

EXPANSION = 4  # a bottleneck's output has 4x its inner width
LAYERS = ((64, 3, 1), (128, 4, 2), (256, 6, 2))  # (inner width, blocks, stride) of layer1..layer3


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride, dilation), 1x1 expand, plus the shortcut (ResNet v1.5: stride on the 3x3)."""

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)  # the residual branch's last norm (scaled by residual_scale)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def make_layer(in_channels: int, width: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    """One ResNet stage.  ``dilation > 1`` replaces the stride (every block dilated, as in CANet)."""
    if dilation > 1:
        stride = 1
    out_channels = width * EXPANSION
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    layers = [Bottleneck(in_channels, width, stride, dilation, downsample)]
    layers += [Bottleneck(out_channels, width, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He-normal (fan out) convs, unit BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
