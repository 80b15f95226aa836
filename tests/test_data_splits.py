"""The splits stage: small-object filters at their thresholds, pools, fold lists and counts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from simprop.data.filters import class_pixel_counts, kept_classes, mask_passes, oslsm_grid
from simprop.data.io import read_id_list, read_pairs
from simprop.data.layout import DataLayout
from simprop.data.splits import build_splits, pools
from simprop.data.voc import fold_classes


def mask_with_sampled_pixels(height: int, width: int, n_sampled: int, extra: int = 0) -> np.ndarray:
    """A mask with exactly ``n_sampled`` pixels on the OSLSM 1/32 grid, plus ``extra`` pixels off it."""
    mask = np.zeros((height, width), bool)
    rows, cols = oslsm_grid(height, width)
    grid = [(r, c) for r in rows for c in cols]
    for r, c in grid[:n_sampled]:
        mask[r, c] = True
    on_grid = np.zeros_like(mask)
    on_grid[np.ix_(rows, cols)] = True
    off = np.argwhere(~on_grid)[:extra]
    mask[off[:, 0], off[:, 1]] = True
    return mask


def test_oslsm_grid_samples_pixel_centres():
    rows, cols = oslsm_grid(375, 500)  # a typical VOC image: 11 x 15 at 1/32
    assert len(rows) == 11 and len(cols) == 15
    assert rows[0] == int(0.5 * 375 / 11) and cols[-1] == int(14.5 * 500 / 15)
    assert oslsm_grid(20, 20) == (np.array([10]), np.array([10]))  # never an empty grid


def test_oslsm_filter_exactly_at_the_threshold():
    # "more than 2 pixels" at 1/32: 2 sampled pixels fail however big the mask, 3 pass however small
    assert not mask_passes(mask_with_sampled_pixels(375, 500, 2, extra=50_000), "oslsm")
    assert mask_passes(mask_with_sampled_pixels(375, 500, 3), "oslsm")


def test_pfenet_filter_exactly_at_the_threshold():
    for pixels, kept in ((2047, False), (2048, True)):
        mask = np.zeros((375, 500), bool)
        mask.ravel()[:pixels] = True
        assert mask_passes(mask, "pfenet") is kept


def test_no_filter_keeps_a_single_pixel_and_void_never_counts():
    label = np.zeros((96, 128), np.uint8)
    label[0, 0] = 9
    label[10:90, 10:120] = 255  # a huge void region is no object
    assert kept_classes(label, "none") == [9]
    assert kept_classes(label, "oslsm") == []
    full, _ = class_pixel_counts(label)
    assert full[9] == 1


def test_pools_follow_the_protocols(data_pipeline):
    layout, _, _ = data_pipeline
    voc_train, voc_val = set(read_id_list(layout.voc_list("train"))), set(read_id_list(layout.voc_list("val")))
    sbd = set(read_id_list(layout.sbd_list("train"))) | set(read_id_list(layout.sbd_list("val")))
    noval = set(read_id_list(layout.train_noval))
    train, test = pools(layout, "oslsm")
    assert set(test) == voc_val and set(train) == (sbd | voc_train) - voc_val
    assert sbd & voc_val  # SBD holds VOC val images: the pool must drop them
    train, test = pools(layout, "pfenet")
    assert set(test) == voc_val and set(train) == voc_train | noval
    for protocol in ("oslsm", "pfenet"):
        train, test = pools(layout, protocol)
        assert not set(train) & set(test) and train == sorted(train)


def test_fold_lists_keep_test_classes_and_test_images_apart(data_pipeline):
    layout, params, metrics = data_pipeline
    voc_val = set(read_id_list(layout.voc_list("val")))
    for fold in params.splits.folds:
        held_out = set(fold_classes(fold))
        train = read_pairs(layout.split_file(fold, "train"))
        val = read_pairs(layout.split_file(fold, "val"))
        test = read_pairs(layout.split_file(fold, "test"))
        assert train and val and test
        assert not {c for _, c in train} & held_out  # no test-class pair in any training list
        assert {c for _, c in val} == {c for _, c in test} == held_out
        train_images = {i for i, _ in train} | {i for i, _ in val}
        test_images = {i for i, _ in test}
        assert not train_images & test_images and not train_images & voc_val and test_images <= voc_val
        counts = metrics[f"fold{fold}"]
        assert (counts["train_pairs"], counts["val_pairs"], counts["test_pairs"]) == (len(train), len(val), len(test))
        assert counts["test_images"] == len(test_images)
    assert json.loads((layout.root / "splits.json").read_text()) == metrics
    per_class = metrics["classes"]
    assert sum(c["test_pool_pairs"] for c in per_class.values()) == sum(
        metrics[f"fold{f}"]["test_pairs"] for f in range(4)
    )


def test_filter_choice_changes_the_pairs_and_only_listed_folds_are_written(data_pipeline, copy_tree, tmp_path):
    source, params, oslsm = data_pipeline
    layout = DataLayout(tmp_path / "data")
    copy_tree(source.raw, "data/raw")
    copy_tree(source.aug, "data/SegmentationClassAug")
    splits = dataclasses.replace(params.splits, small_object_filter="none", folds=(2,))
    unfiltered = build_splits(layout, splits, tmp_path / "m.json", workers=1, progress=False)
    assert sorted(p.name for p in layout.splits.iterdir()) == ["fold2"]
    assert "fold0" not in unfiltered
    assert unfiltered["fold2"]["test_pairs"] > oslsm["fold2"]["test_pairs"]
    assert unfiltered["fold2"]["train_pairs"] > oslsm["fold2"]["train_pairs"]
