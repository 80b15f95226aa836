"""mIoU / FB-IoU bookkeeping: pooling over episodes, void handling, per-class ids and names."""

import math

import numpy as np
import pytest
import torch

from simprop.engine.metrics import (
    EpisodeMetrics,
    aggregate_seeds,
    confusion_counts,
    confusion_counts_many,
    episode_label,
    mean_std,
    scoring_label,
)
from simprop.voc import (
    VOC_CLASSES,
    class_id,
    class_name,
    fold_classes,
    split_name,
    train_classes,
)


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


def test_batched_counts_equal_the_per_episode_counts_and_check_the_same_things():
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 255], size=(7, 19, 23)).astype(np.uint8)
    labels[3] = 255  # an all-void episode counts nothing
    preds = rng.integers(0, 2, size=(7, 19, 23)).astype(bool)
    many = confusion_counts_many(preds, labels)
    assert many.shape == (7, 4) and many.dtype == np.int64
    assert [tuple(int(v) for v in row) for row in many] == [confusion_counts(p, l) for p, l in zip(preds, labels)]
    assert tuple(many[3]) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="episode_label"):
        confusion_counts_many(preds, np.full((7, 19, 23), 7, np.uint8))
    with pytest.raises(ValueError, match="one size"):
        confusion_counts_many(preds, labels[:, :-1])
    a, b = EpisodeMetrics(), EpisodeMetrics()
    for p, l, row in zip(preds, labels, many):
        a.update(p, l, 5)
        b.add_counts(row, 5)
    assert a.summary() == b.summary()
    with pytest.raises(ValueError, match="four non-negative"):
        b.add_counts((1, 2, 3), 5)


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


# ---------------------------------------------------------------------- issue 10: classes, scoring


def test_miou_over_the_fold_counts_missing_classes_as_zero():
    fold0 = fold_classes(0)
    m = EpisodeMetrics(classes=fold0)
    m.update(*_episode(tp=4, fp=0, fn=0, tn=4), class_id=1)  # IoU 1
    m.update(*_episode(tp=1, fp=1, fn=0, tn=4), class_id=2)  # IoU 0.5
    m.update(*_episode(tp=0, fp=0, fn=0, tn=5, void=3), class_id=3)  # empty union: undefined
    # classes 4 and 5 had no episode: (1 + 0.5 + 0 + 0 + 0) / 5, never (1 + 0.5) / 2
    assert m.miou() == pytest.approx(1.5 / 5)
    summary = m.summary()
    assert summary["classes_scored"] == 2 and summary["classes_in_mean"] == 5
    assert summary["class_iou"] == {"aeroplane": 100.0, "bicycle": 50.0, "bird": None, "boat": None, "bottle": None}
    assert summary["miou"] == pytest.approx(30.0)
    with pytest.raises(ValueError, match="not one of this accumulator's classes"):
        m.update(*_episode(tp=1, fp=0, fn=0, tn=1), class_id=6)
    # without known classes the mean is over the classes seen, and says so
    seen = EpisodeMetrics()
    seen.update(*_episode(tp=4, fp=0, fn=0, tn=4), class_id=1)
    seen.update(*_episode(tp=1, fp=1, fn=0, tn=4), class_id=2)
    assert seen.miou() == pytest.approx(0.75) and seen.summary()["classes_scored"] == 2
    assert seen.summary()["classes_in_mean"] == 2
    assert aggregate_seeds([summary, {**summary, "classes_scored": 1}])["classes_scored"] == 1


def test_scoring_label_conventions_by_hand():
    label = np.array([[1, 0], [0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(scoring_label(label, 1), [[1, 0], [0, 255]])
    np.testing.assert_array_equal(scoring_label(label, 1, void="background"), [[1, 0], [0, 0]])
    # 321: PIL nearest reads source pixel floor((i + 0.5) * 2 / 321): rows/columns 0..159 -> 0, 160..320 -> 1
    big = scoring_label(label, 1, resolution="321")
    assert big.shape == (321, 321)
    assert (big == 1).sum() == 160 * 160 and (big == 255).sum() == 161 * 161
    assert big[159, 159] == 1 and big[160, 160] == 255
    assert (scoring_label(label, 1, resolution="321", void="background") == 255).sum() == 0
    # a 7-pixel row: output column i reads floor((i + 0.5) * 7 / 321); value v starts at ceil(v * 321 / 7 - 0.5)
    row = scoring_label(np.arange(7, dtype=np.uint8)[None], 3, resolution="321")
    assert np.flatnonzero(row[0] == 1).tolist() == list(range(138, 183))
    with pytest.raises(ValueError, match="evaluate.resolution"):
        scoring_label(label, 1, resolution="500")
