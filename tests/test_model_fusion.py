"""The fusions read the support: FBAF's conv blocks (eq. 3), the tiled-prototype convolution
shortcut, and CANet's IOM history at training and test time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simprop.model.canet import CANetFusion
from simprop.model.decoder import ASPP, DilatedConv2d
from simprop.model.fbaf import FBAFFusion
from simprop.model.network import build_model
from simprop.model.prototype_conv import conv_with_tiled_prototype
from simprop.params import ModelParams

pytestmark = pytest.mark.usefixtures("one_thread")
NARROW = 16
INTERIOR = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the zero-padded border


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def fbaf_inputs(seed: int, channels: int = NARROW, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(2, channels, size, size, generator=g))  # post-ReLU like the encoder's
    fg_a, fg_b, bg = (torch.relu(torch.randn(2, channels, generator=g)) for _ in range(3))
    return features, fg_a, fg_b, bg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fbaf_output_depends_on_the_foreground_prototype_away_from_the_border(seed):
    torch.manual_seed(seed)
    fbaf = FBAFFusion(NARROW).eval()
    features, fg_a, fg_b, bg = fbaf_inputs(seed)
    with torch.no_grad():
        g1_a, g1_b = fbaf.prepare(features, fg_a, bg)["g1"], fbaf.prepare(features, fg_b, bg)["g1"]
        g_a, g_b = fbaf(features, fg_a, bg), fbaf(features, fg_b, bg)
    # With the ReLU inside the residual, Z^f gates the features: G1 and G change substantially
    assert relative_change(g1_a[INTERIOR], g1_b[INTERIOR]) > 0.2
    assert relative_change(g_a[INTERIOR], g_b[INTERIOR]) > 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bare_convolution_form_of_eq3_loses_the_prototype(seed):
    """IN(Conv3x3(G0) + G0), the equation read literally: the tiled Z^f is a per-channel
    constant inside the map, which the instance normalisation removes; only the border
    (zero padding) and the normalisation statistics it shifts are left."""
    torch.manual_seed(seed)
    fbaf = FBAFFusion(NARROW).eval()
    features, fg_a, fg_b, _ = fbaf_inputs(seed)

    def bare_g1(fg):
        g0 = torch.cat([features, fg[:, :, None, None].expand_as(features)], dim=1)
        return fbaf.norm_g1(fbaf.conv_g1(g0) + g0)

    with torch.no_grad():
        change = relative_change(bare_g1(fg_a)[INTERIOR], bare_g1(fg_b)[INTERIOR])
        gated = relative_change(fbaf.prepare(features, fg_a, fg_a)["g1"][INTERIOR],
                                fbaf.prepare(features, fg_b, fg_b)["g1"][INTERIOR])  # fmt: skip
    assert change < 0.1
    assert gated > 3 * change


@pytest.mark.parametrize(
    "in_channels,out_channels,dilation,size",
    [(16, 32, 1, (9, 9)), (16, 16, 2, (13, 7)), (8, 8, 2, (3, 4)), (32, 64, 1, (41, 41))],
)
def test_tiled_prototype_shortcut_equals_the_naive_convolution(in_channels, out_channels, dilation, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(2 * in_channels, out_channels, 3, padding=dilation, dilation=dilation)
    features = torch.randn(3, in_channels, *size)
    prototype = torch.randn(3, in_channels)
    with torch.no_grad():
        naive = conv(torch.cat([features, prototype[:, :, None, None].expand_as(features)], dim=1))
        fast = conv_with_tiled_prototype(conv, features, prototype)
    assert fast.shape == naive.shape
    assert float((fast - naive).abs().max()) <= 1e-5


def test_tiled_prototype_shortcut_backpropagates_like_the_naive_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=2, dilation=2)
    features = torch.randn(2, 8, 11, 11, requires_grad=True)
    prototype = torch.randn(2, 8, requires_grad=True)
    grads = []
    for fn in (lambda: conv(torch.cat([features, prototype[:, :, None, None].expand_as(features)], 1)),
               lambda: conv_with_tiled_prototype(conv, features, prototype)):  # fmt: skip
        conv.zero_grad()
        features.grad = prototype.grad = None
        (fn() ** 2).sum().backward()
        grads.append([features.grad.clone(), prototype.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()])
    for naive, fast in zip(*grads):
        torch.testing.assert_close(fast, naive, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "dilation,size",
    [(6, (9, 9)), (12, (9, 9)), (18, (9, 9)), (12, (20, 9)), (12, (9, 20)), (2, (41, 41)), (18, (41, 41)), (3, (3, 3))],
)
def test_dilated_conv_skipping_padding_taps_equals_conv2d_in_values_and_gradients(dilation, size):
    """ASPP's branches drop the taps that read only zero padding (d >= the map's height or width):
    the same outputs and the same input, weight and bias gradients as ``nn.Conv2d``."""
    torch.manual_seed(0)
    naive = nn.Conv2d(6, 5, 3, padding=dilation, dilation=dilation)
    fast = DilatedConv2d(6, 5, dilation)
    fast.load_state_dict(naive.state_dict())
    assert list(fast.state_dict()) == list(naive.state_dict())
    x = torch.randn(3, 6, *size, requires_grad=True)
    results = []
    for conv in (naive, fast):
        x.grad = None
        out = conv(x)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float summation order only
    if dilation >= max(size):  # only the middle tap reads the map: the others get exactly no gradient
        outer = fast.weight.grad.clone()
        outer[:, :, 1, 1] = 0
        assert float(outer.abs().max()) == 0.0


def test_aspp_branches_skip_padding_taps_only_on_small_maps():
    torch.manual_seed(0)
    aspp = ASPP(8, 4)
    dilated = [branch[0] for branch in aspp.branches[1:]]
    assert [type(conv) for conv in dilated] == [DilatedConv2d] * 3
    assert [conv.dilation[0] for conv in dilated] == [6, 12, 18]
    for size in ((9, 9), (41, 41)):
        x = torch.randn(2, 8, *size)
        with torch.no_grad():
            for conv in dilated:
                reference = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation)
                assert float((conv(x) - reference).abs().max()) <= 1e-5


def test_shortcut_refuses_convolutions_it_does_not_cover():
    with pytest.raises(ValueError, match="stride-1"):
        conv_with_tiled_prototype(nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.randn(1, 2, 8, 8), torch.randn(1, 2))


def test_canet_comparison_uses_the_prototype_everywhere():
    torch.manual_seed(0)
    fusion = CANetFusion(NARROW, dropout=0.0).eval()
    features, fg_a, fg_b, bg = fbaf_inputs(0)
    with torch.no_grad():
        a = fusion.prepare(features, fg_a, bg)["compared"]
        b = fusion.prepare(features, fg_b, bg)["compared"]
    assert relative_change(a[INTERIOR], b[INTERIOR]) > 0.2


# ------------------------------------------------------------------ CANet's IOM


def tiny_episode(batch=2, size=33):
    torch.manual_seed(1)
    q = torch.randn(batch, 3, size, size)
    s = torch.randn(batch, 1, 3, size, size)
    m = torch.zeros(batch, 1, size, size)
    m[..., 8:24, 8:24] = 1
    return q, s, m


@pytest.mark.parametrize("variant", ["canet", "dpr"])
def test_iom_history_is_an_input_in_training_and_its_prediction_comes_back(variant):
    model = build_model(variant, ModelParams(channels=NARROW, dropout=0.0), init_seed=0).train()
    assert model.uses_iom
    q, s, m = tiny_episode()
    zeros = model(q, s, m)
    assert zeros["query_probs"].shape == (2, 2, 5, 5)  # softmax at the feature size (33 px -> 5 x 5)
    torch.testing.assert_close(zeros["query_probs"].sum(1), torch.ones(2, 5, 5))
    history = torch.rand(2, 2, 5, 5)
    fed = model(q, s, m, query_history=history)
    assert relative_change(zeros["query"], fed["query"]) > 1e-3  # the history changes the prediction
    explicit_zeros = model(q, s, m, query_history=torch.zeros(2, 2, 5, 5))
    torch.testing.assert_close(explicit_zeros["query"], zeros["query"])
    if "support" in zeros:  # DPr: a support has no history of its own, so its prediction is unchanged
        torch.testing.assert_close(fed["support"], zeros["support"])


def test_variants_without_iom_ignore_the_history():
    model = build_model("simpropnet", ModelParams(channels=NARROW, dropout=0.0), init_seed=0).train()
    assert not model.uses_iom and model.iom_iterations == 0
    q, s, m = tiny_episode()
    out = model(q, s, m)
    assert "query_probs" not in out
    torch.testing.assert_close(model(q, s, m, query_history=torch.rand(2, 2, 5, 5))["query"], out["query"])


def test_iom_at_test_time_runs_the_configured_refinement_passes():
    params = ModelParams(channels=NARROW, iom_iterations=3)
    model = build_model("canet", params, init_seed=0).eval()
    q, s, m = tiny_episode()
    with torch.no_grad():
        out = model(q, s, m)["query"]
        # by hand: one pass with zero history, then three passes each fed the previous softmax
        fq = model.encode(model.backbone_features(q))
        fs = model.encode(model.backbone_features(s.flatten(0, 1)))
        from simprop.model.prototypes import masked_average_pool

        zf, zb = masked_average_pool(fs, m.flatten(0, 1))
        state = model.fusion.prepare(fq, zf, zb)
        logits = model.decoder(model.fusion.refine(state, None))
        first = logits
        for _ in range(3):
            logits = model.decoder(model.fusion.refine(state, F.softmax(logits, dim=1)))
        expected = F.interpolate(logits, size=(33, 33), mode="bilinear", align_corners=True)
        no_refinement = build_model("canet", ModelParams(channels=NARROW, iom_iterations=0), init_seed=0).eval()
        single = no_refinement(q, s, m)["query"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single, F.interpolate(first, size=(33, 33), mode="bilinear", align_corners=True),
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    assert relative_change(out, single) > 1e-4


def test_iom_variants_are_a_param():
    model = build_model("fbaf", ModelParams(channels=NARROW, iom_variants=("fbaf",), iom_iterations=2))
    assert model.uses_iom and model.iom_iterations == 2 and model.fusion.history_channels == 2
    canet = build_model("canet", ModelParams(channels=NARROW, iom_variants=(), iom_iterations=2))
    assert not canet.uses_iom and canet.iom_iterations == 0
