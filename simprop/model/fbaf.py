"""Foreground/Background Attentive Fusion, FBAF (paper §3.4, eq. 2-3).

Eq. 3 writes each of its three steps as ``IN(Conv3x3(x) + x)``.  Implemented literally, with a
bare (linear) convolution, the first step loses the support: the tiled prototype Z^f is
constant over the map, a linear map of a constant is a constant per channel, and the instance
normalisation subtracts every channel's mean over the map, so Z^f reaches G1 only through the
zero-padded border.  The paper's "Conv3x3" is a conv block as in the CANet code it builds on
(``one_shot_network.py`` of icoz69/CaNet: every convolution of the fusion, comparison and
ASPP is followed by a ReLU; the paper singles out only the decoder's last layer as linear).
With the ReLU inside the residual and before the normalisation, each step is::

    G1 = IN(ReLU(Conv3x3(G0)) + G0)

and Z^f *gates* the features, as CANet's dense comparison does: ``ReLU(W_F F + W_Z Z^f + b)``
is zero or not per position depending on how the features compare with the prototype, and
that survives the normalisation.  (A ReLU after the IN would not help: the prototype is
already gone by then.)  ``tests/test_model.py`` shows the difference on a random module.

The first convolution runs as :func:`~simprop.model.prototype_conv.conv_with_tiled_prototype`:
exactly ``Conv3x3(F ⊕ tile(Z^f))``, without convolving the constant half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simprop.model.encoder import FEATURE_CHANNELS
from simprop.model.prototype_conv import conv_with_tiled_prototype

COSINE_EPS = 1e-8
ATTENTION_SUM_EPS = 1e-12
HISTORY_CHANNELS = 2  # previous prediction fed back by CANet's IOM (when the variant uses it)


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
    """Eq. 3 with conv blocks, applied alike to support and query features::

        G0 = F ⊕ Z^f                                  (prototype tiled over the map)
        G1 = IN(ReLU(Conv3x3(G0)) + G0)
        G2 = IN(ReLU(Conv3x3(G1 ⊕ A^f ⊕ A^b [⊕ H])) + G1)
        G  = IN(ReLU(Conv3x3(G2)) + G2)

    ``H`` is the previous prediction (2 channels) when the variant runs CANet's IOM
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
        g0 = torch.cat([features, fg_prototype[:, :, None, None].expand_as(features)], dim=1)
        g1 = self.norm_g1(F.relu(conv_with_tiled_prototype(self.conv_g1, features, fg_prototype)) + g0)
        af, ab = attention_maps(features, fg_prototype, bg_prototype)
        return {"g1": g1, "af": af, "ab": ab}

    def refine(self, state: dict[str, Tensor], history: Tensor | None = None) -> Tensor:
        g1 = state["g1"]
        parts = [g1, state["af"].to(g1.dtype), state["ab"].to(g1.dtype)]
        if self.history_channels:
            parts.append(history.to(g1.dtype) if history is not None else g1.new_zeros(g1.shape[0], self.history_channels, *g1.shape[2:]))
        g2 = self.norm_g2(F.relu(self.conv_g2(torch.cat(parts, dim=1))) + g1)
        return self.norm_g(F.relu(self.conv_g(g2)) + g2)

    def forward(self, features: Tensor, fg_prototype: Tensor, bg_prototype: Tensor, history: Tensor | None = None) -> Tensor:
        return self.refine(self.prepare(features, fg_prototype, bg_prototype), history)
