"""CANet's dense comparison fusion and iterative optimisation module (protocol §6).

Fusion: the foreground prototype is tiled over the feature map and concatenated with the
features (512 ch) -> 3x3 conv (dilation 2) to 256, ReLU, Dropout2d (``layer55`` of
icoz69/CaNet ``one_shot_network.py``).  Then three residual blocks (ReLU, 3x3 conv, ReLU,
3x3 conv) without normalisation (``residule1..3``); the first one also takes the previous
prediction (2 ch; zeros on the first pass and whenever the IOM is off), which is how CANet's
IOM feeds its prediction back.  The background prototype is not used (CANet is
foreground-only).  The comparison convolution runs as
:func:`~simprop.model.prototype_conv.conv_with_tiled_prototype` (the same function, without
convolving the constant tiled half).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from simprop.model.encoder import FEATURE_CHANNELS
from simprop.model.fbaf import HISTORY_CHANNELS
from simprop.model.prototype_conv import conv_with_tiled_prototype

COMPARISON_DILATION = 2
NUM_RESIDUAL_BLOCKS = 3


class ResidualBlock(nn.Module):
    """out = x + conv(relu(conv(relu(x ⊕ extra)))) as in CANet's ``residule`` blocks."""

    def __init__(self, channels: int, extra_channels: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels + extra_channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.extra_channels = extra_channels

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        inp = torch.cat([x, extra], dim=1) if self.extra_channels else x
        return x + self.body(inp)


class CANetFusion(nn.Module):
    """Dense comparison (prototype tiling + conv) followed by the IOM residual blocks."""

    def __init__(self, feature_channels: int = FEATURE_CHANNELS, dropout: float = 0.5) -> None:
        super().__init__()
        self.out_channels = feature_channels
        self.history_channels = HISTORY_CHANNELS
        self.comparison = nn.Conv2d(
            2 * feature_channels, feature_channels, 3, padding=COMPARISON_DILATION, dilation=COMPARISON_DILATION
        )
        self.dropout = nn.Dropout2d(dropout)
        self.residual_blocks = nn.ModuleList(
            [ResidualBlock(feature_channels, HISTORY_CHANNELS)]
            + [ResidualBlock(feature_channels) for _ in range(NUM_RESIDUAL_BLOCKS - 1)]
        )

    def prepare(self, features: Tensor, fg_prototype: Tensor, bg_prototype: Tensor) -> dict[str, Tensor]:
        compared = torch.relu(conv_with_tiled_prototype(self.comparison, features, fg_prototype))
        return {"compared": self.dropout(compared)}

    def refine(self, state: dict[str, Tensor], history: Tensor | None = None) -> Tensor:
        out = state["compared"]
        if history is None:
            history = out.new_zeros(out.shape[0], self.history_channels, *out.shape[2:])
        out = self.residual_blocks[0](out, history.to(out.dtype))
        for block in self.residual_blocks[1:]:
            out = block(out)
        return out

    def forward(self, features: Tensor, fg_prototype: Tensor, bg_prototype: Tensor, history: Tensor | None = None) -> Tensor:
        return self.refine(self.prepare(features, fg_prototype, bg_prototype), history)
