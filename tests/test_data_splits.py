"""The splits stage: small-object filters at their thresholds, pools, fold lists and counts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from simprop.data.filters import (
    OSLSM_MIN_SIDE,
    class_pixel_counts,
    kept_classes,
    mask_passes,
    oslsm_downsample,
    oslsm_grid,
)
from simprop.data.io import read_id_list, read_pairs
from simprop.data.layout import DataLayout
from simprop.data.splits import (
    PUBLISHED_LISTS,
    PUBLISHED_OSLSM,
    build_splits,
    compare_with_published,
    list_digest,
    pools,
    published_lines,
    published_warning,
)
from simprop.voc import fold_classes


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


def test_oslsm_rule_on_hand_made_masks():
    """Answers worked out by hand from OSLSM's rule: pad 15 at the top/left, zeros to
    ceil((n + 30) / 32) * 32, nearest resize to ceil((n + 30) / 32): rows/columns 32k + 1 are read."""
    # a 40 x 40 square at the top-left corner of a VOC-sized image holds rows and columns 1 and 33:
    # 2 x 2 = 4 samples > 2, so OSLSM keeps it (pixel-centre sampling at 375 / 11 = 34 px reads row 17
    # and column 16 only, 1 sample, and would drop it)
    square = np.zeros((375, 500), bool)
    square[:40, :40] = True
    assert oslsm_downsample(square).shape == (13, 17)  # ceil(405 / 32), ceil(530 / 32)
    assert oslsm_downsample(square).sum() == 4 and mask_passes(square, "oslsm")
    # a one-pixel-high band across a 96 x 128 image: on row 33 = 32 + 1 it holds 4 samples (columns
    # 1, 33, 65, 97), on row 49 = 32 + 17 (a pixel centre of the 1/32 grid) none
    for row, samples in ((33, 4), (49, 0), (1, 4), (17, 0), (0, 0), (2, 0)):
        band = np.zeros((96, 128), bool)
        band[row] = True
        assert oslsm_downsample(band).sum() == samples, row
        assert mask_passes(band, "oslsm") is (samples > 2)
    # three pixels exactly on samples pass; the same shape shifted by 16 rows and columns fails
    on, off = np.zeros((96, 96), bool), np.zeros((96, 96), bool)
    on[[1, 1, 33], [1, 33, 1]] = True
    off[[17, 17, 49], [17, 49, 17]] = True
    assert mask_passes(on, "oslsm") and not mask_passes(off, "oslsm")


def test_oslsm_rule_at_sizes_that_are_and_are_not_multiples_of_32():
    # (height, width) -> output size and samples of an all-ones mask, by hand:
    # 96 (= 3 x 32): ceil(126 / 32) = 4 outputs, rows 1, 33, 65 inside (97 reads padding) -> 3
    # 64 (= 2 x 32): ceil(94 / 32) = 3 outputs, rows 1, 33 -> 2
    # 97: ceil(127 / 32) = 4 outputs, rows 1, 33, 65 (97 is past the last row, 96) -> 3
    # 98: ceil(128 / 32) = 4 outputs, rows 1, 33, 65, 97 -> 4
    # 130: ceil(160 / 32) = 5 outputs, rows 1, 33, 65, 97, 129 -> 5
    cases = {(96, 96): ((4, 4), 9), (64, 64): ((3, 3), 4), (97, 64): ((4, 3), 6), (98, 96): ((4, 4), 12),
             (100, 130): ((5, 5), 20), (1, 1): ((32, 32), 1)}  # fmt: skip
    for (h, w), (shape, samples) in cases.items():
        out = oslsm_downsample(np.ones((h, w), bool))
        assert out.shape == shape and out.sum() == samples, (h, w)
        rows, cols = oslsm_grid(h, w)
        assert len(rows) * len(cols) == samples
    # the last row of a 98-row image is sampled (row 97), that of a 97- or 96-row image is not
    for h, kept in ((98, True), (97, False), (96, False)):
        last = np.zeros((h, 96), bool)
        last[-1] = True
        assert mask_passes(last, "oslsm") is kept, h
    assert OSLSM_MIN_SIDE == 66 and len(oslsm_grid(66, 66)[0]) == 3 and len(oslsm_grid(65, 65)[0]) == 2


def test_grid_counts_equal_scikit_image_resize_on_random_masks():
    """The splits stage counts samples on the 32k + 1 grid; OSLSM's literal pad + resize must agree."""
    rng = np.random.default_rng(0)
    sizes = [(96, 128), (128, 96), (375, 500), (500, 375), (333, 500), (64, 65), (31, 33), (2, 2), (1, 1), (1, 40)]
    for h, w in sizes:
        rows, cols = oslsm_grid(h, w)
        for density in (0.002, 0.02, 0.5):
            label = np.where(rng.random((h, w)) < density, rng.integers(1, 4, (h, w)), 0).astype(np.uint8)
            _, sampled = class_pixel_counts(label)
            for c in (1, 2, 3):
                mask = label == c
                assert oslsm_downsample(mask).sum() == mask[np.ix_(rows, cols)].sum() == sampled[c], (h, w, c)
                assert mask_passes(mask, "oslsm") == (c in kept_classes(label, "oslsm")) == bool(sampled[c] > 2)


def test_scikit_image_anti_aliasing_would_change_the_rule():
    """Why anti_aliasing=False is spelt out: today's default smooths float input first."""
    from skimage.transform import resize

    band = np.zeros((96, 128), np.float32)
    band[49] = 1.0  # between two sampled rows: OSLSM reads 0 samples
    padded = np.pad(band, ((15, 17), (15, 17)))
    assert oslsm_downsample(band).sum() == 0
    assert resize(padded, (4, 5), order=0, preserve_range=True).sum() > 0


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


# ---------------------------------------------------------------------------- published lists (issue 10)


def test_published_list_lines_and_md5():
    """HSNet's list format, `<image>__<class 2 digits>` sorted bytewise, each line ending in a newline."""
    import hashlib

    pairs = [("2008_000002", 20), ("2007_000033", 12), ("2007_000033", 1), ("2007_000129", 2)]
    text = "2007_000033__01\n2007_000033__12\n2007_000129__02\n2008_000002__20\n"
    assert published_lines(pairs) == text.encode()
    assert list_digest(pairs) == (4, hashlib.md5(text.encode()).hexdigest())
    assert list_digest(reversed(pairs)) == list_digest(pairs)  # order of the input does not matter
    # the published values are the ones in the reference notes (protocol.md section 3)
    assert PUBLISHED_LISTS["val"][2] == (725, "b7d01149959ae68c2147f60963998fdc")
    assert [PUBLISHED_LISTS["trn"][f][0] for f in range(4)] == list(PUBLISHED_OSLSM["val_pairs"])
    assert [PUBLISHED_LISTS["val"][f][0] for f in range(4)] == list(PUBLISHED_OSLSM["test_pairs"])


def test_comparison_with_the_published_lists(monkeypatch):
    val, test = [("a", 1), ("b", 2)], [("c", 3)]
    monkeypatch.setitem(PUBLISHED_LISTS, "trn", {0: list_digest(val)})
    monkeypatch.setitem(PUBLISHED_LISTS, "val", {0: (1, "0" * 32)})
    result = compare_with_published({0: {"train": [], "val": val, "test": test}})
    assert result[0]["trn"]["matches_published"] is True and result[0]["trn"]["pairs"] == 2
    assert result[0]["val"]["matches_published"] is False and result[0]["val"]["md5"] == list_digest(test)[1]
    warning = published_warning(result)
    assert "fold0 val (our test.csv)" in warning and "fold0 trn" not in warning
    assert published_warning({0: {"trn": result[0]["trn"]}}) is None


def test_splits_stage_checks_the_published_lists_only_for_voc_and_oslsm(data_pipeline, copy_tree, tmp_path):
    source, params, synthetic = data_pipeline
    assert synthetic["published_lists"]["checked"] is False and synthetic["published_lists"]["matches_all"] is None
    assert all(synthetic[f"fold{f}"]["matches_published"] == {"trn": None, "val": None} for f in range(4))
    layout = DataLayout(tmp_path / "data")
    copy_tree(source.raw, "data/raw")
    copy_tree(source.aug, "data/SegmentationClassAug")
    metrics = build_splits(layout, params.splits, tmp_path / "m.json", workers=1, progress=False, data_source="voc")
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    published = metrics["published_lists"]
    assert published["checked"] is True and published["matches_all"] is False  # a generated tree is not VOC
    for fold in range(4):
        assert metrics[f"fold{fold}"]["matches_published"] == {"trn": False, "val": False}
        entry = published[f"fold{fold}"]["val"]
        assert entry["pairs"] == metrics[f"fold{fold}"]["test_pairs"]
        assert entry["md5"] == list_digest(read_pairs(layout.split_file(fold, "test")))[1]
        assert entry["published_md5"] == PUBLISHED_LISTS["val"][fold][1]
    pfenet = dataclasses.replace(params.splits, protocol="pfenet")
    other = build_splits(layout, pfenet, tmp_path / "p.json", workers=1, progress=False, data_source="voc")
    assert other["published_lists"]["checked"] is False
