"""Foreground/Background Attentive Fusion, FBAF (paper §3.4, eq. 2-3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simprop.model.encoder import FEATURE_CHANNELS

COSINE_EPS = 1e-8
ATTENTION_SUM_EPS = 1e-12
HISTORY_CHANNELS = 2  # previous prediction fed back by the optional IOM refinement


def similarity_map(features: Tensor, prototype: Tensor) -> Tensor:
    """C(F, Z) = (1 + cossim(F, Z)) / 2 per position: [N,C,h,w] x [N,C] -> [N,1,h,w] in [0,1]."""
    cos = F.cosine_similarity(features, prototype[:, :, None, None].expand_as(features), dim=1, eps=COSINE_EPS)
    return ((1.0 + cos) / 2.0).clamp(0.0, 1.0).unsqueeze(1)


def attention_maps(features: Tensor, fg_prototype: Tensor, bg_prototype: Tensor) -> tuple[Tensor, Tensor]:
    """A^f, A^b = N(C(F, Z^f), C(F, Z^b)) with N(A, B) = (A/(A+B), B/(A+B)) (eq. 2).

    A^b is computed as 1 - A^f so that A^f + A^b = 1 exactly; where both similarities are
    0 (A + B = 0) the maps are 1/2 each.
    """
    a = similarity_map(features, fg_prototype)
    b = similarity_map(features, bg_prototype)
    total = a + b
    af = torch.where(total > ATTENTION_SUM_EPS, a / total.clamp_min(ATTENTION_SUM_EPS), torch.full_like(a, 0.5))
    return af, 1.0 - af


class FBAFFusion(nn.Module):
    """Eq. 3, applied alike to support and query features::

        G0 = F ⊕ Z^f                      (prototype tiled over the map)
        G1 = IN(Conv3x3(G0) + G0)
        G2 = IN(Conv3x3(G1 ⊕ A^f ⊕ A^b [⊕ H]) + G1)
        G  = IN(Conv3x3(G2) + G2)

    ``H`` is the previous prediction (2 channels) when the optional IOM refinement is on
    (``history=True``); the paper's FBAF has none.
    """

    def __init__(self, feature_channels: int = FEATURE_CHANNELS, history: bool = False) -> None:
        super().__init__()
        self.out_channels = channels = 2 * feature_channels
        self.history_channels = HISTORY_CHANNELS if history else 0
        self.conv_g1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_g2 = nn.Conv2d(channels + 2 + self.history_channels, channels, 3, padding=1)
        self.conv_g = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm_g1 = nn.InstanceNorm2d(channels)
        self.norm_g2 = nn.InstanceNorm2d(channels)
        self.norm_g = nn.InstanceNorm2d(channels)

    def prepare(self, features: Tensor, fg_prototype: Tensor, bg_prototype: Tensor) -> dict[str, Tensor]:
        """The part that does not depend on the previous prediction: G1 and the attention maps."""
        tiled = fg_prototype[:, :, None, None].expand_as(features)
        g0 = torch.cat([features, tiled], dim=1)
        g1 = self.norm_g1(self.conv_g1(g0) + g0)
        af, ab = attention_maps(features, fg_prototype, bg_prototype)
        return {"g1": g1, "af": af, "ab": ab}

    def refine(self, state: dict[str, Tensor], history: Tensor | None = None) -> Tensor:
        g1 = state["g1"]
        parts = [g1, state["af"], state["ab"]]
        if self.history_channels:
            parts.append(history if history is not None else g1.new_zeros(g1.shape[0], self.history_channels, *g1.shape[2:]))
        g2 = self.norm_g2(self.conv_g2(torch.cat(parts, dim=1)) + g1)
        return self.norm_g(self.conv_g(g2) + g2)

    def forward(self, features: Tensor, fg_prototype: Tensor, bg_prototype: Tensor, history: Tensor | None = None) -> Tensor:
        return self.refine(self.prepare(features, fg_prototype, bg_prototype), history)
