"""mIoU / FB-IoU bookkeeping: pooling over episodes, void handling, per-class ids and names."""

import math

import numpy as np
import pytest
import torch

from simprop.metrics import (
    EpisodeMetrics,
    aggregate_seeds,
    confusion_counts,
    episode_label,
    mean_std,
)
from simprop.voc import VOC_CLASSES, class_id, class_name, fold_classes, split_name, train_classes


def test_voc_names_and_folds():
    assert len(VOC_CLASSES) == 20
    assert class_name(1) == "aeroplane" and class_name(15) == "person" and class_name(20) == "tvmonitor"
    assert class_id("diningtable") == 11
    assert fold_classes(0) == (1, 2, 3, 4, 5)
    assert fold_classes(3) == (16, 17, 18, 19, 20)
    assert set(train_classes(1)) == set(range(1, 21)) - {6, 7, 8, 9, 10}
    assert split_name(2) == "split-3"
    with pytest.raises(ValueError):
        fold_classes(4)
    with pytest.raises(ValueError):
        class_name(0)


def test_counts_ignore_void_pixels():
    label = np.array([[1, 1, 0, 255], [0, 0, 255, 255]], dtype=np.uint8)
    pred = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=np.uint8)
    # void pixels (predicted 1 or 0) count nowhere
    assert confusion_counts(pred, label) == (1, 2, 1, 1)


def test_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    label = rng.choice([0, 1, 255], size=(37, 53)).astype(np.uint8)
    pred = rng.integers(0, 2, size=(37, 53))
    expected = confusion_counts(pred, label)
    assert confusion_counts(torch.from_numpy(pred), torch.from_numpy(label)) == expected
    assert confusion_counts(torch.from_numpy(pred).bool(), label) == expected
    assert sum(expected) == int((label != 255).sum())


def test_shape_mismatch_and_raw_label_are_rejected():
    with pytest.raises(ValueError, match="original label resolution"):
        confusion_counts(np.zeros((4, 4)), np.zeros((8, 8)))
    raw = np.array([[0, 7, 7, 255]])
    with pytest.raises(ValueError, match="episode_label"):
        confusion_counts(np.zeros((1, 4)), raw)
    np.testing.assert_array_equal(episode_label(raw, 7), [[0, 1, 1, 255]])
    np.testing.assert_array_equal(episode_label(torch.tensor(raw), 7).numpy(), [[0, 1, 1, 255]])


def _episode(tp, fp, fn, tn, void=0):
    """A 1-row episode with exactly the given counts."""
    label = np.array([1] * tp + [0] * fp + [1] * fn + [0] * tn + [255] * void, dtype=np.uint8)
    pred = np.array([1] * tp + [1] * fp + [0] * fn + [0] * tn + [1] * void, dtype=np.uint8)
    return pred[None], label[None]


def test_class_iou_is_pooled_over_episodes_not_averaged():
    m = EpisodeMetrics()
    m.update(*_episode(tp=1, fp=0, fn=0, tn=5), class_id=3)  # IoU 1.0 alone
    m.update(*_episode(tp=1, fp=9, fn=0, tn=5), class_id=3)  # IoU 0.1 alone
    # pooled: 2 / (2 + 9) — not the mean of per-episode IoUs (0.55)
    assert m.class_iou() == {3: pytest.approx(2 / 11)}


def test_per_class_ious_keep_their_own_class():
    """Classes with very different IoUs: a shift by one class would be caught here."""
    m = EpisodeMetrics()
    expected = {6: 0.9, 7: 0.1, 8: 0.5, 9: 0.0, 10: 0.25}
    for cid, iou in expected.items():
        tp = round(iou * 20)
        # feed episodes out of order and split over two episodes each
        m.update(*_episode(tp=tp, fp=20 - tp, fn=0, tn=3, void=2), class_id=cid)
    m.update(*_episode(tp=0, fp=0, fn=0, tn=7), class_id=9)  # empty fg: adds nothing but an episode
    got = m.class_iou()
    assert list(got) == [6, 7, 8, 9, 10]
    for cid, iou in expected.items():
        assert got[cid] == pytest.approx(iou), class_name(cid)
    s = m.summary()
    assert s["class_iou"]["bus"] == pytest.approx(90.0)
    assert s["class_iou"]["car"] == pytest.approx(10.0)
    assert s["class_iou"]["cat"] == pytest.approx(50.0)
    assert s["class_iou"]["chair"] == pytest.approx(0.0)
    assert s["class_iou"]["cow"] == pytest.approx(25.0)
    assert s["class_iou_by_id"]["6"] == pytest.approx(90.0)
    assert s["miou"] == pytest.approx(100 * np.mean(list(expected.values())))
    assert s["episodes"] == 6
    assert m.episodes_per_class() == {6: 1, 7: 1, 8: 1, 9: 2, 10: 1}


def test_miou_is_mean_over_classes_seen_only():
    m = EpisodeMetrics()
    m.update(*_episode(1, 1, 0, 0), class_id=1)  # 0.5
    m.update(*_episode(1, 0, 0, 0), class_id=4)  # 1.0
    assert m.classes_seen() == (1, 4)
    assert m.miou() == pytest.approx(0.75)


def test_fbiou_pools_foreground_and_background_over_all_episodes():
    m = EpisodeMetrics()
    m.update(*_episode(tp=2, fp=1, fn=1, tn=4, void=3), class_id=1)
    m.update(*_episode(tp=6, fp=0, fn=2, tn=2), class_id=2)
    # totals: TP 8, FP 1, FN 3, TN 6
    fg, bg = m.fg_bg_iou()
    assert fg == pytest.approx(8 / 12)
    assert bg == pytest.approx(6 / 10)
    assert m.fbiou() == pytest.approx((8 / 12 + 6 / 10) / 2)
    assert m.summary()["fbiou"] == pytest.approx(100 * (8 / 12 + 6 / 10) / 2)


def test_undefined_class_iou_is_none_and_left_out_of_mean():
    m = EpisodeMetrics()
    m.update(*_episode(0, 0, 0, 4, void=2), class_id=2)  # nothing to find, nothing predicted
    m.update(*_episode(3, 1, 0, 0), class_id=1)
    assert math.isnan(m.class_iou()[2])
    assert m.summary()["class_iou"]["bicycle"] is None
    assert m.miou() == pytest.approx(0.75)


def test_merge_equals_single_accumulator():
    rng = np.random.default_rng(1)
    eps = [
        (rng.integers(0, 2, (9, 11)), rng.choice([0, 1, 255], (9, 11)), int(rng.integers(1, 21)))
        for _ in range(12)
    ]
    whole = EpisodeMetrics()
    a, b = EpisodeMetrics(), EpisodeMetrics()
    for i, (p, l, c) in enumerate(eps):
        whole.update(p, l, c)
        (a if i % 2 else b).update(p, l, c)
    assert a.merge(b).summary() == whole.summary()


def test_bad_class_id():
    with pytest.raises(ValueError, match="1..20"):
        EpisodeMetrics().update(np.zeros((2, 2)), np.zeros((2, 2)), class_id=0)


def test_aggregate_seeds_uses_sample_std():
    seeds = [
        {"miou": 50.0, "fbiou": 60.0, "class_iou": {"bus": 10.0, "car": 90.0}},
        {"miou": 52.0, "fbiou": 62.0, "class_iou": {"bus": 20.0, "car": 80.0}},
        {"miou": 57.0, "fbiou": 61.0, "class_iou": {"bus": 30.0, "car": 70.0}},
    ]
    agg = aggregate_seeds(seeds)
    assert agg["num_seeds"] == 3
    assert agg["miou_mean"] == pytest.approx(53.0)
    assert agg["miou_std"] == pytest.approx(np.std([50, 52, 57], ddof=1))
    assert agg["fbiou_std"] == pytest.approx(1.0)
    assert agg["class_iou_mean"] == {"bus": pytest.approx(20.0), "car": pytest.approx(80.0)}
    assert agg["class_iou_std"]["bus"] == pytest.approx(10.0)
    one = aggregate_seeds(seeds[:1])
    assert one["miou_mean"] == 50.0 and one["miou_std"] == 0.0
    assert mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    with pytest.raises(ValueError):
        aggregate_seeds([])
