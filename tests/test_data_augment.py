"""The augment stage: palette PNGs read as indices, SBD .mat conversion, VOC overriding SBD."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from simprop.data.augment import build_segmentation_class_aug
from simprop.data.errors import LabelError
from simprop.data.io import read_id_list, read_label, read_palette_png, read_sbd_mat
from simprop.data.layout import DataLayout
from simprop.voc import voc_palette


def palette_png(path, label: np.ndarray) -> None:
    img = Image.fromarray(label, mode="P")
    img.putpalette(voc_palette())
    img.save(path)


def test_palette_png_reading_keeps_class_indices(tmp_path):
    label = np.array([[0, 1, 15], [20, 255, 7]], np.uint8)
    palette_png(tmp_path / "m.png", label)
    assert np.array_equal(read_palette_png(tmp_path / "m.png"), label)
    # what the naive reading gives, and why the reader refuses RGB renderings of masks:
    with Image.open(tmp_path / "m.png") as img:
        assert not np.array_equal(np.array(img.convert("L")), label)
        img.convert("RGB").save(tmp_path / "rgb.png")
    with pytest.raises(LabelError, match="rgb.png.*mode 'RGB'"):
        read_palette_png(tmp_path / "rgb.png")


def test_out_of_range_values_are_refused(tmp_path):
    Image.fromarray(np.array([[0, 21]], np.uint8), mode="L").save(tmp_path / "bad.png")
    with pytest.raises(LabelError, match=r"bad.png.*\[21\]"):
        read_palette_png(tmp_path / "bad.png")


def test_sbd_mat_conversion(tmp_path):
    label = np.zeros((5, 7), np.uint8)
    label[1:3, 2:5] = 12
    savemat(tmp_path / "a.mat", {"GTcls": {"Segmentation": label, "CategoriesPresent": np.array([[12]], np.uint8)}})
    assert np.array_equal(read_sbd_mat(tmp_path / "a.mat"), label)
    (tmp_path / "empty.mat").write_bytes(b"")
    with pytest.raises(LabelError, match="empty.mat"):
        read_sbd_mat(tmp_path / "empty.mat")
    savemat(tmp_path / "nogt.mat", {"other": label})
    with pytest.raises(LabelError, match="nogt.mat"):
        read_sbd_mat(tmp_path / "nogt.mat")
    savemat(tmp_path / "blank.mat", {"GTcls": {"Segmentation": np.zeros((0, 0), np.uint8)}})
    with pytest.raises(LabelError, match="blank.mat.*empty"):
        read_sbd_mat(tmp_path / "blank.mat")


def test_segmentation_class_aug_is_sbd_overwritten_by_voc(data_pipeline):
    layout, _, _ = data_pipeline
    voc_ids = set(read_id_list(layout.voc_list("trainval")))
    sbd_ids = set(read_id_list(layout.sbd_list("train"))) | set(read_id_list(layout.sbd_list("val")))
    assert sorted(p.stem for p in layout.aug.iterdir()) == sorted(voc_ids | sbd_ids)
    both = sorted(voc_ids & sbd_ids)[0]
    sbd_only = sorted(sbd_ids - voc_ids)[0]
    with Image.open(layout.label(both)) as img:
        assert img.mode == "L"
    voc_label = read_palette_png(layout.voc_masks / f"{both}.png")
    assert np.array_equal(read_label(layout.label(both)), voc_label) and 255 in voc_label  # VOC wins, void kept
    assert not np.array_equal(read_sbd_mat(layout.sbd_masks / f"{both}.mat"), voc_label)
    assert np.array_equal(read_label(layout.label(sbd_only)), read_sbd_mat(layout.sbd_masks / f"{sbd_only}.mat"))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda layout, i: (layout.voc_masks / f"{i}.png").write_bytes(b"\x89PNG broken"), "unreadable mask"),
        (lambda layout, i: (layout.voc_masks / f"{i}.png").unlink(), "missing"),
        (lambda layout, i: layout.image(i).write_bytes(b"not a jpeg"), "unreadable image"),
        (lambda layout, i: palette_png(layout.voc_masks / f"{i}.png", np.zeros((10, 10), np.uint8)), "but its image"),
    ],
    ids=["corrupt-mask", "missing-mask", "corrupt-image", "size-mismatch"],
)
def test_bad_inputs_name_the_file(data_pipeline, copy_tree, damage, match):
    layout = DataLayout(copy_tree(data_pipeline[0].raw, "data/raw").parent)
    image_id = read_id_list(layout.voc_list("val"))[0]
    damage(layout, image_id)
    with pytest.raises(LabelError, match=f"{image_id}.*{match}"):
        build_segmentation_class_aug(layout, workers=2, progress=False)
    assert not layout.aug.exists() and not list(layout.root.glob("SegmentationClassAug.tmp-*"))


def test_workers_do_not_change_the_result(data_pipeline, copy_tree):
    source = data_pipeline[0]
    layout = DataLayout(copy_tree(source.raw, "data/raw").parent)
    build_segmentation_class_aug(layout, workers=1, progress=False)
    for path in sorted(source.aug.iterdir()):
        assert (layout.aug / path.name).read_bytes() == path.read_bytes()
