"""The encoder conv as one matrix product + shifted adds is the same function as conv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simprop.model.encoder import FeatureProjection
from simprop.model.shifted_gemm import (
    ShiftedGemmConv2d,
    _ShiftedGemmConv,
    shifted_gemm_conv3x3,
)

# (batch, in channels, height, width, out channels, dilation): the default setup's projection,
# maps smaller than the dilation (taps entirely in the padding), non-square maps, dilation 1
SHAPES = [(16, 1536, 9, 9, 16, 2), (2, 7, 1, 3, 5, 2), (3, 4, 3, 2, 2, 4), (2, 5, 6, 7, 3, 1)]


@pytest.mark.parametrize("n,c,h,w,o,d", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_gradients_equal_conv2d_in_fp32(n, c, h, w, o, d, channels_last):
    torch.manual_seed(0)
    conv = ShiftedGemmConv2d(c, o, dilation=d)
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn(n, o, h, w)

    out = conv(x)
    out.backward(grad_out)
    ours = (out.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = conv.weight.grad = conv.bias.grad = None
    reference = F.conv2d(x, conv.weight, conv.bias, padding=d, dilation=d)
    reference.backward(grad_out)
    expected = (reference.detach(), x.grad, conv.weight.grad, conv.bias.grad)

    assert out.is_contiguous()  # the layers after it get the usual NCHW layout
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), ours, expected):
        scale = max(1.0, b.abs().max().item())  # sums over up to 1536*9*1296 terms: relative
        assert (a - b).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("n,c,h,w,o,d", [(2, 3, 4, 5, 2, 2), (1, 2, 2, 3, 3, 3), (2, 4, 3, 3, 2, 1)])
def test_gradcheck_in_float64(n, c, h, w, o, d):
    torch.manual_seed(1)
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(o, c, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(o, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, e: _ShiftedGemmConv.apply(a, b, e, d), (x, weight, bias))


def test_without_bias_and_with_frozen_input():
    torch.manual_seed(2)
    conv = ShiftedGemmConv2d(6, 4, dilation=2, bias=False)
    x = torch.randn(3, 6, 5, 5)  # cached features: no gradient wanted
    conv(x).square().sum().backward()
    ours = conv.weight.grad.clone()
    conv.weight.grad = None
    F.conv2d(x, conv.weight, None, padding=2, dilation=2).square().sum().backward()
    assert torch.allclose(ours, conv.weight.grad, rtol=1e-5, atol=1e-5)
    assert x.grad is None


def test_falls_back_to_conv2d_outside_cpu_float32():
    torch.manual_seed(3)
    conv = ShiftedGemmConv2d(4, 3, dilation=2).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=2, dilation=2))


def test_rejects_a_kernel_that_is_not_3x3():
    with pytest.raises(ValueError, match="3x3 kernel"):
        shifted_gemm_conv3x3(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 5, 5), None, 1)


def test_projection_keeps_the_state_dict_of_a_plain_conv():
    """Checkpoints written before (``projection.0`` an ``nn.Conv2d``) load unchanged."""
    plain = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 3, padding=2, dilation=2), torch.nn.ReLU(), torch.nn.Dropout2d(0.1))
    projection = FeatureProjection(8, 4, dropout=0.1)
    projection.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(projection.eval()(x), plain.eval()(x), atol=1e-6)
