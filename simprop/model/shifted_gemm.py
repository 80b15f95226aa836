"""The encoder's dilated 3x3 convolution as one matrix product and nine shifted adds.

A 3x3 convolution with dilation ``d`` and "same" zero padding sums, over its nine taps
``(i, j)``, a 1x1 convolution of the input shifted by ``((i-1)d, (j-1)d)``::

    out[n, o, y, x] = b[o] + Σ_ij Σ_c W[o, c, i, j] · in[n, c, y + (i-1)d, x + (j-1)d]

so all nine 1x1 convolutions are one product of the input pixels ``[N·H·W, C]`` with the
stacked tap weights ``[C, 9·O]``, after which each tap's ``O`` columns are added to the output
shifted by their offset (the "kn2row" form of a convolution).  The weight gradient is likewise
one product of the shifted output gradients with the same input matrix.

Why: the shared encoder conv (1536 -> ``model.channels``, paper §3.2) on the default setup's
9 x 9 cached feature maps was a large share of every training step, and oneDNN's dilated
direct convolution is memory-bound there (an im2col copy would be 9x the input).  This form reads
the input once per pass; with channels-last input (the feature cache stores NHWC rows,
:mod:`simprop.engine.features`) the input matrix is a view, no copy.  Measured with
``python3 benchmarks/bench_train_step.py``: docs/performance.md, "The default training step".

It is the same function as ``torch.nn.functional.conv2d`` up to float summation order
(``tests/test_shifted_gemm.py``: fp32 values and gradients against ``conv2d``, and
``gradcheck`` in float64).  :class:`ShiftedGemmConv2d` uses it on the CPU in float32 outside
autocast only; on CUDA, under autocast or in other dtypes it calls ``conv2d`` as before
(cuDNN's implicit GEMM already avoids the copy, and this form is not measured there).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _tap_windows(height: int, width: int, dilation: int) -> Iterator[tuple[int, tuple[slice, slice], tuple[slice, slice]]]:
    """For each tap ``k = 3i + j``: the output window and the input window it reads.

    Output pixel ``y`` reads input row ``y + dy`` (``dy = (i-1)d``) where that is inside the
    map; rows whose partner falls in the zero padding get nothing from this tap.
    """

    def window(length: int, offset: int) -> tuple[slice, slice]:
        # output rows y with 0 <= y + offset < length, and the input rows y + offset
        lo, hi = max(0, -offset), min(length, length - offset)
        hi = max(lo, hi)  # empty when the offset is at least the length
        return slice(lo, hi), slice(lo + offset, hi + offset)

    for i in range(3):
        out_rows, in_rows = window(height, (i - 1) * dilation)
        for j in range(3):
            out_cols, in_cols = window(width, (j - 1) * dilation)
            yield 3 * i + j, (out_rows, out_cols), (in_rows, in_cols)


class _ShiftedGemmConv(torch.autograd.Function):
    """Autograd of the shifted-GEMM convolution (input, weight and bias gradients)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
        n, c, h, w = x.shape
        o = weight.shape[0]
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view for channels-last input
        taps = weight.permute(2, 3, 0, 1).reshape(9 * o, c)  # row 3i+j block: W[:, :, i, j]
        per_tap = (pixels @ taps.t()).view(n, h, w, 9, o)
        out = x.new_zeros(n, h, w, o) if bias is None else bias.expand(n, h, w, o).clone()
        for k, (oy, ox), (iy, ix) in _tap_windows(h, w, dilation):
            out[:, oy, ox] += per_tap[:, iy, ix, k]
        ctx.save_for_backward(pixels, taps)
        ctx.geometry = (n, c, h, w, o, dilation, bias is not None)
        # the rest of the network sees the usual contiguous NCHW layout
        return out.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pixels, taps = ctx.saved_tensors
        n, c, h, w, o, dilation, has_bias = ctx.geometry
        grad = grad_out.permute(0, 2, 3, 1)  # [n, h, w, o]
        # d(per_tap)[:, in window, k] = grad[:, out window]: the forward's scatter, reversed
        grad_taps = grad.new_zeros(n, h, w, 9, o)
        for k, (oy, ox), (iy, ix) in _tap_windows(h, w, dilation):
            grad_taps[:, iy, ix, k] = grad[:, oy, ox]
        grad_taps = grad_taps.view(n * h * w, 9 * o)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_taps @ taps).view(n, h, w, c).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_taps.t() @ pixels).view(3, 3, o, c).permute(2, 3, 0, 1)
        if has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 1, 2))
        return grad_x, grad_weight, grad_bias, None


def shifted_gemm_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """``conv2d(x, weight, bias, padding=dilation, dilation=dilation)`` for a 3x3 ``weight``."""
    if weight.shape[2:] != (3, 3) or x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"shifted_gemm_conv3x3: needs a 3x3 kernel over the input's channels, got "
                         f"input {tuple(x.shape)} and weight {tuple(weight.shape)}")  # fmt: skip
    return _ShiftedGemmConv.apply(x, weight, bias, dilation)


class ShiftedGemmConv2d(nn.Conv2d):
    """A 3x3, stride-1, "same"-padded (``padding = dilation``) ``nn.Conv2d`` (same parameters
    and state-dict keys) that runs as :func:`shifted_gemm_conv3x3` on the CPU in float32."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        ):
            return shifted_gemm_conv3x3(x, self.weight, self.bias, self.dilation[0])
        return F.conv2d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation)
