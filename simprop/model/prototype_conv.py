"""A convolution of ``features ⊕ tile(prototype)`` without convolving the constant map.

Both fusions start with a convolution of the query (or support) features concatenated with a
prototype tiled over the map: CANet's dense comparison (``Conv3x3_d2(F ⊕ Z^f)``) and FBAF's
``Conv3x3(G0)`` with ``G0 = F ⊕ Z^f`` (paper eq. 3).  Split the kernel along its input
channels, ``W = [W_F | W_Z]``: the convolution is ``conv(F, W_F) + conv(tile(Z), W_Z)``.
The second term needs no convolution.  At an output position it sums ``W_Z[:, :, i, j] · Z``
over the kernel taps ``(i, j)`` that fall inside the map (zero padding contributes
nothing), and whether a tap falls inside depends on the row and the column separately::

    conv(tile(Z), W_Z)[b, o, y, x] = Σ_ij P[b, o, i, j] · R[i, y] · C[j, x]
    P[b, o, i, j] = Σ_c W_Z[o, c, i, j] · Z[b, c]
    R[i, y] = 1 if 0 <= y + (i - k//2)·d < H else 0        (C likewise for the columns)

So the tiled half costs one small matrix product per sample instead of a full convolution:
the 2C-channel input of FBAF's first convolution becomes a C-channel one (issue 12).  It is
exactly the same function (``tests/test_model.py`` compares it with the naive convolution of
the concatenated map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _taps_inside(length: int, kernel: int, dilation: int, padding: int, like: Tensor) -> Tensor:
    """[kernel, length] 0/1: does tap ``i`` of an output position ``y`` read inside the map?"""
    positions = torch.arange(length, device=like.device)[None, :] + (
        torch.arange(kernel, device=like.device)[:, None] * dilation - padding
    )
    return ((positions >= 0) & (positions < length)).to(like.dtype)


def conv_with_tiled_prototype(conv: nn.Conv2d, features: Tensor, prototype: Tensor) -> Tensor:
    """``conv(features ⊕ prototype tiled over the map)`` for ``features`` [B,C,h,w], ``prototype`` [B,Cz].

    ``conv`` takes ``C + Cz`` input channels (features first), stride 1, and keeps the size
    (``padding = dilation * (kernel // 2)``, zero padding).
    """
    channels = features.shape[1]
    kh, kw = conv.kernel_size
    if conv.stride != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError("conv_with_tiled_prototype needs a stride-1, ungrouped, zero-padded convolution")
    weight = conv.weight
    out = F.conv2d(features, weight[:, :channels], conv.bias, padding=conv.padding, dilation=conv.dilation)
    per_tap = torch.einsum("ocij,bc->boij", weight[:, channels:], prototype.to(weight.dtype))
    rows = _taps_inside(features.shape[2], kh, conv.dilation[0], conv.padding[0], out)
    cols = _taps_inside(features.shape[3], kw, conv.dilation[1], conv.padding[1], out)
    return out + torch.einsum("boij,iy,jx->boyx", per_tap.to(out.dtype), rows, cols)
