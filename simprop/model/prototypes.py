"""Masked average pooling (paper eq. 1) and k-shot prototype averaging (eq. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

AREA_EPS = 1e-6  # a mask region with less total weight than this counts as empty


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a [N,H,W] (or [N,1,H,W]) {0,1} mask to the feature size -> [N,1,h,w] in [0,1]."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=True)


def masked_average_pool(features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground and background prototypes Z^f, Z^b (eq. 1) of ``features`` [N,C,h,w].

    ``mask`` [N,H,W] is the support mask (1 = foreground); it is resized to (h, w).  Each
    prototype is the mask-weighted mean of the features over its region.  A region that is
    empty (no foreground, or a mask covering the whole image for the background) gives an
    all-zero prototype instead of 0/0 = NaN.  Returns two [N,C] tensors.
    """
    m = resize_mask(mask, tuple(features.shape[-2:]))
    fg = _weighted_mean(features, m)
    bg = _weighted_mean(features, 1.0 - m)
    return fg, bg


def _weighted_mean(features: Tensor, weight: Tensor) -> Tensor:
    area = weight.sum(dim=(2, 3))  # [N,1]
    # [N,C]: the sum of features * weight over the map, as one bmm (cheaper than multiply-then-sum)
    dtype = torch.promote_types(features.dtype, weight.dtype)  # as features * weight would
    total = torch.bmm(features.flatten(2).to(dtype), weight.flatten(2).transpose(1, 2).to(dtype))[..., 0]
    empty = area < AREA_EPS
    return torch.where(empty, torch.zeros_like(total), total / area.clamp_min(AREA_EPS))


def region_is_empty(mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Booleans [N] telling which masks have an empty foreground / background at ``size``."""
    m = resize_mask(mask, size)
    fg_area = m.sum(dim=(1, 2, 3))
    bg_area = (1.0 - m).sum(dim=(1, 2, 3))
    return fg_area < AREA_EPS, bg_area < AREA_EPS


def average_shots(prototypes: Tensor, empty: Tensor | None = None) -> Tensor:
    """Average [B,K,C] prototypes over the K supports (eq. 4) -> [B,C].

    With ``empty`` [B,K] the supports whose region is empty are left out of the mean (their
    prototype is an all-zero placeholder, not evidence); if all K are empty the result is 0.
    """
    if empty is None:
        return prototypes.mean(dim=1)
    keep = (~empty).to(prototypes.dtype).unsqueeze(-1)  # [B,K,1]
    count = keep.sum(dim=1)  # [B,1]
    return (prototypes * keep).sum(dim=1) / count.clamp_min(1.0)
