"""SimPropNet model family: shapes, FBAF, pooling, k-shot, gradients, BN, ICA, losses, overfit."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_episodes

from simprop.model import IGNORE_INDEX, VARIANTS
from simprop.model.encoder import BACKBONE_CHANNELS, OUTPUT_STRIDE
from simprop.model.fbaf import attention_maps
from simprop.model.ica import apply_input_channel_averaging, ica_probability
from simprop.model.losses import dual_prediction_loss, segmentation_loss
from simprop.model.network import build_model
from simprop.model.prototypes import masked_average_pool
from simprop.params import VARIANTS as PARAM_VARIANTS
from simprop.params import ModelParams

# Most tests use a narrow network (model.channels) so the file runs in about a minute on a
# shared 2-core CPU; the architecture is the same code at any width.
NARROW = 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")


def episode(batch, shots, size):
    h, w = size
    q = torch.randn(batch, 3, h, w)
    s = torch.randn(batch, shots, 3, h, w)
    m = torch.zeros(batch, shots, h, w)
    m[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    return q, s, m


def test_variants_match_params_and_flags():
    assert tuple(VARIANTS) == PARAM_VARIANTS
    assert [(s.fusion, s.dual_prediction, s.ica) for s in VARIANTS.values()] == [
        ("canet", False, False),
        ("canet", True, False),
        ("fbaf", False, False),
        ("fbaf", True, False),
        ("fbaf", True, True),
    ]
    with pytest.raises(ValueError, match="unknown variant"):
        build_model("pfenet", ModelParams())


def test_output_shapes_321():
    model = build_model("simpropnet", ModelParams()).train()  # the paper's width, 256
    q, s, m = episode(1, 1, (321, 321))
    out = model(q, s, m)
    assert out["query"].shape == (1, 2, 321, 321)
    assert out["support"].shape == (1, 2, 321, 321)
    feats = model.backbone_features(q)
    assert feats.shape == (1, BACKBONE_CHANNELS, 41, 41)  # output stride 8
    assert (321 - 1) // OUTPUT_STRIDE + 1 == 41


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shots", [1, 5])
def test_output_shapes_non_square(variant, shots):
    model = build_model(variant, ModelParams(iom_iterations=1, channels=NARROW))
    q, s, m = episode(2, shots, (33, 47))
    model.train()
    out = model(q, s, m)
    assert out["query"].shape == (2, 2, 33, 47)
    if VARIANTS[variant].dual_prediction:
        assert out["support"].shape == (2 * shots, 2, 33, 47)
    else:
        assert "support" not in out
    model.eval()
    with torch.no_grad():
        out = model(q, s, m)
    assert set(out) == {"query"} and out["query"].shape == (2, 2, 33, 47)
    assert torch.isfinite(out["query"]).all()
    out = model(q, s, m, predict_support=True)
    assert out["support"].shape == (2 * shots, 2, 33, 47)


def test_precomputed_features_give_the_same_output_and_need_out_size():
    model = build_model("dpr_fbaf", ModelParams(channels=NARROW)).eval()
    q, s, m = episode(2, 2, (41, 53))
    qf = model.backbone_features(q)
    sf = model.backbone_features(s.flatten(0, 1)).view(2, 2, *qf.shape[1:])
    with torch.no_grad():
        ref = model(q, s, m)["query"]
        got = model(support_masks=m, query_feats=qf, support_feats=sf, out_size=(41, 53))["query"]
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="out_size"):
        model(support_masks=m, query_feats=qf, support_feats=sf)


def test_init_seed_fixes_the_trainable_initialisation_and_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    a = build_model("simpropnet", ModelParams(channels=NARROW), init_seed=3).trainable_state_dict()
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(99)  # whatever the global state, the same seed gives the same network
    b = build_model("simpropnet", ModelParams(channels=NARROW), init_seed=3).trainable_state_dict()
    c = build_model("simpropnet", ModelParams(channels=NARROW), init_seed=4).trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def test_fbaf_attention_maps_in_unit_interval_and_sum_to_one():
    f = torch.randn(3, 16, 7, 9)
    zf, zb = torch.randn(3, 16), torch.randn(3, 16)
    zb[1] = 0.0  # an empty background region gives a zero prototype
    af, ab = attention_maps(f, zf, zb)
    assert af.shape == ab.shape == (3, 1, 7, 9)
    for a in (af, ab):
        assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(af + ab, torch.ones_like(af))
    # a feature identical to Z^f and opposite to Z^b is fully foreground: C = 1 vs 0
    af, _ = attention_maps(zf[:1, :, None, None], zf[:1], -zf[:1])
    assert af.item() == pytest.approx(1.0)


def test_masked_average_pool_of_constant_map_is_the_constant():
    f = torch.full((2, 8, 9, 9), 3.5)
    mask = torch.zeros(2, 65, 65)
    mask[:, 10:40, 20:50] = 1
    fg, bg = masked_average_pool(f, mask)
    torch.testing.assert_close(fg, torch.full((2, 8), 3.5))
    torch.testing.assert_close(bg, torch.full((2, 8), 3.5))


def test_masked_average_pool_weights_by_mask_and_handles_empty_regions():
    f = torch.zeros(1, 1, 4, 4)
    f[..., :2, :] = 1.0
    mask = torch.zeros(1, 4, 4)
    mask[:, :2, :] = 1
    fg, bg = masked_average_pool(f, mask)
    assert fg.item() == pytest.approx(1.0) and bg.item() == pytest.approx(0.0)
    fg, bg = masked_average_pool(torch.randn(2, 8, 5, 5), torch.zeros(2, 33, 33))
    assert torch.equal(fg, torch.zeros(2, 8)) and torch.isfinite(bg).all()
    fg, bg = masked_average_pool(torch.randn(2, 8, 5, 5), torch.ones(2, 33, 33))
    assert torch.equal(bg, torch.zeros(2, 8)) and torch.isfinite(fg).all()


@pytest.mark.parametrize("variant", ["canet", "simpropnet"])
def test_five_copies_of_one_support_equal_one_shot(variant):
    model = build_model(variant, ModelParams(channels=NARROW)).eval()
    q, s, m = episode(2, 1, (49, 41))
    with torch.no_grad():
        one = model(q, s, m)["query"]
        five = model(q, s.expand(-1, 5, -1, -1, -1), m.expand(-1, 5, -1, -1))["query"]
    torch.testing.assert_close(five, one, atol=1e-5, rtol=1e-4)


def test_k_shot_skips_supports_with_empty_foreground():
    model = build_model("fbaf", ModelParams(channels=NARROW)).eval()
    q, s, m = episode(1, 2, (41, 41))
    m[:, 1] = 0  # second support has no foreground
    with torch.no_grad():
        two = model(q, s, m)["query"]
        one = model(q, s[:, :1], m[:, :1])["query"]
        empty = model(q, s[:, 1:], m[:, 1:])["query"]
    torch.testing.assert_close(two, one, atol=5e-5, rtol=1e-4)  # logits ~0.2: float noise only
    assert torch.isfinite(empty).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_reach_every_trainable_parameter_and_not_the_backbone(variant):
    model = build_model(variant, ModelParams(iom_iterations=1, channels=NARROW)).train()
    q, s, m = episode(2, 1, (41, 41))
    labels = m[:, 0].long()
    loss = dual_prediction_loss(model(q, s, m), labels, m.long())
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
            assert p.grad.abs().sum() > 0, name
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for p in model.trainable_parameters())
    assert counts["frozen"] > 8_000_000


def test_backbone_batchnorm_statistics_unchanged_after_a_training_step():
    model = build_model("dpr", ModelParams(channels=NARROW))
    model.train()
    assert not model.backbone.training
    assert all(not mod.training for mod in model.backbone.modules())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9)
    q, s, m = episode(2, 1, (41, 41))
    q, s = q * 3 + 1, s * 3 + 1  # statistics unlike ImageNet's: train-mode BN would move
    loss = dual_prediction_loss(model(q, s, m), m[:, 0].long(), m.long())
    loss.backward()
    opt.step()
    after = model.backbone.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    model.backbone.train()  # even asked directly, the frozen backbone stays in eval mode
    assert not model.backbone.training


def test_ica_schedule_and_operation():
    assert ica_probability(0, 0.25, 0.98) == pytest.approx(0.25)
    assert ica_probability(10, 0.25, 0.98) == pytest.approx(0.25 * 0.98**10)
    ps = [ica_probability(e, 0.25, 0.9) for e in range(50)]
    assert all(a > b for a, b in zip(ps, ps[1:])) and ps[-1] < 0.002
    with pytest.raises(ValueError):
        ica_probability(-1, 0.25, 0.98)

    images = torch.randn(6, 3, 5, 7)
    grey = apply_input_channel_averaging(images, 1.0)
    torch.testing.assert_close(grey, images.mean(1, keepdim=True).expand_as(images))
    assert torch.equal(apply_input_channel_averaging(images, 0.0), images)
    a = apply_input_channel_averaging(images, 0.5, torch.Generator().manual_seed(3))
    b = apply_input_channel_averaging(images, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    many = torch.randn(4000, 3, 1, 2)
    out = apply_input_channel_averaging(many, 0.25, torch.Generator().manual_seed(0))
    frac = (~torch.isclose(out, many).all(dim=(1, 2, 3))).float().mean().item()
    assert 0.22 < frac < 0.28

    model = build_model("simpropnet", ModelParams(channels=NARROW))
    model.train()
    assert torch.equal(model.maybe_apply_ica(images, 1.0), grey)
    model.eval()
    assert torch.equal(model.maybe_apply_ica(images, 1.0), images)  # never at evaluation
    other = build_model("dpr_fbaf", ModelParams(channels=NARROW)).train()
    assert not other.uses_ica and torch.equal(other.maybe_apply_ica(images, 1.0), images)


def test_loss_ignores_255():
    logits = torch.randn(2, 2, 9, 9, requires_grad=True)
    labels = torch.randint(0, 2, (2, 9, 9))
    labels[:, :3] = IGNORE_INDEX
    loss = segmentation_loss(logits, labels)
    valid = labels != IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    torch.testing.assert_close(loss, ref)
    changed = logits.detach().clone()
    changed[:, :, :3] += 100.0  # ignored pixels do not matter
    torch.testing.assert_close(segmentation_loss(changed, labels), loss.detach())
    loss.backward()
    assert torch.all(logits.grad[:, :, :3] == 0)
    all_ignored = segmentation_loss(logits, torch.full((2, 9, 9), IGNORE_INDEX))
    assert all_ignored.item() == 0.0  # no NaN for an all-ignore batch
    # logits are upsampled to the label size
    assert torch.isfinite(segmentation_loss(torch.randn(1, 2, 5, 5), torch.zeros(1, 33, 33, dtype=torch.long)))


def test_dual_prediction_loss_is_query_plus_support():
    q_logits, s_logits = torch.randn(2, 2, 9, 9), torch.randn(6, 2, 9, 9)
    q_lab, s_lab = torch.randint(0, 2, (2, 9, 9)), torch.randint(0, 2, (2, 3, 9, 9))
    total, terms = dual_prediction_loss({"query": q_logits, "support": s_logits}, q_lab, s_lab, return_terms=True)
    torch.testing.assert_close(total, segmentation_loss(q_logits, q_lab) + segmentation_loss(s_logits, s_lab.flatten(0, 1)))
    assert set(terms) == {"query", "support"}
    assert dual_prediction_loss({"query": q_logits}, q_lab) == segmentation_loss(q_logits, q_lab)
    with pytest.raises(ValueError, match="support_labels"):
        dual_prediction_loss({"query": q_logits, "support": s_logits}, q_lab)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_overfits_a_handful_of_episodes(variant):
    """Three generated episodes, random backbone, cached features, width 64: loss falls >= 10x."""
    size = (33, 33)
    model = build_model(variant, ModelParams(dropout=0.0, channels=64))
    query, supports, masks, q_lab, s_lab = make_episodes(3, size=size, seed=1)
    qf = model.backbone_features(query)
    sf = model.backbone_features(supports.flatten(0, 1)).view(3, 1, *qf.shape[1:])
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(300):
        out = model(support_masks=masks, query_feats=qf, support_feats=sf, out_size=size)
        assert ("support" in out) == VARIANTS[variant].dual_prediction
        loss = dual_prediction_loss(out, q_lab, s_lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() <= losses[0] / 10:
            break
    assert losses[-1] <= losses[0] / 10, f"{variant}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
