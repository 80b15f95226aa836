"""The embedded generated dataset: archive layout, label formats, determinism, difficulty."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy.io import loadmat

from simprop.data.filters import kept_classes
from simprop.data.io import read_id_list, read_palette_png
from simprop.data.synthetic import write_synthetic_tree
from simprop.data.synthetic_images import CLASS_SCENE, SCENE_PREFERENCE, STYLES, choose_scene
from simprop.errors import ParamsError
from simprop.params import SyntheticParams, params_from_dict
from simprop.voc import IGNORE_INDEX, voc_palette


def test_lists_relate_like_the_real_archives(data_pipeline):
    layout, params, _ = data_pipeline
    voc_train, voc_val = set(read_id_list(layout.voc_list("train"))), set(read_id_list(layout.voc_list("val")))
    sbd_train, sbd_val = set(read_id_list(layout.sbd_list("train"))), set(read_id_list(layout.sbd_list("val")))
    noval = set(read_id_list(layout.train_noval))
    assert set(read_id_list(layout.voc_list("trainval"))) == voc_train | voc_val
    assert not voc_train & voc_val and not sbd_train & sbd_val
    assert len(voc_train | voc_val) == params.data.synthetic.num_voc_images
    assert len(sbd_train | sbd_val) == params.data.synthetic.num_sbd_images
    assert noval <= sbd_train and not noval & voc_val
    assert (sbd_train | sbd_val) & voc_val and (sbd_train | sbd_val) & voc_train  # overlaps, as in reality
    for image_id in voc_train | voc_val | sbd_train | sbd_val:
        assert layout.image(image_id).is_file()  # every image in VOC JPEGImages
    for image_id in sbd_train | sbd_val:
        assert (layout.sbd_images / f"{image_id}.jpg").read_bytes() == layout.image(image_id).read_bytes()
        assert (layout.sbd_masks / f"{image_id}.mat").is_file()
    assert sorted(p.stem for p in layout.voc_masks.iterdir()) == sorted(voc_train | voc_val)


def test_voc_masks_are_palette_pngs_with_void_bands(data_pipeline):
    layout, params, _ = data_pipeline
    path = sorted(layout.voc_masks.iterdir())[0]
    with Image.open(path) as img:
        assert img.mode == "P" and img.getpalette()[: 3 * 256] == voc_palette()
        assert img.size == (params.data.synthetic.width, params.data.synthetic.height)
    label = read_palette_png(path)
    assert IGNORE_INDEX in label and set(np.unique(label)) - {0, IGNORE_INDEX}


def test_sbd_mat_holds_the_gtcls_struct(data_pipeline):
    layout, _, _ = data_pipeline
    path = sorted(layout.sbd_masks.iterdir())[0]
    gtcls = loadmat(path)["GTcls"]
    segmentation = gtcls[0]["Segmentation"][0]  # the expression every SBD reader uses
    assert segmentation.dtype == np.uint8 and segmentation.ndim == 2 and IGNORE_INDEX not in segmentation
    present = sorted(int(c) for c in np.unique(segmentation) if c)
    assert gtcls[0]["CategoriesPresent"][0].ravel().tolist() == present
    boundaries = gtcls[0]["Boundaries"][0]
    assert boundaries.shape == (20, 1) and boundaries[present[0] - 1, 0].sum() > 0


def tree_digest(raw: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in raw.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(raw)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_same_params_give_a_byte_identical_tree_whatever_the_workers(tmp_path):
    params = SyntheticParams(num_sbd_images=40, num_voc_images=40, width=96, height=96, seed=3)
    write_synthetic_tree(tmp_path / "a", params, workers=1)
    write_synthetic_tree(tmp_path / "b", params, workers=2)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    write_synthetic_tree(tmp_path / "c", SyntheticParams(num_sbd_images=40, num_voc_images=40, width=96, height=96))
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_the_task_is_not_trivial(data_pipeline):
    """Several classes per image, some objects dropped by the filter, distinct class styles."""
    layout, _, _ = data_pipeline
    labels = [read_palette_png(p) for p in sorted(layout.voc_masks.iterdir())]
    present = [set(np.unique(lab).tolist()) - {0, IGNORE_INDEX} for lab in labels]
    kept = [set(kept_classes(lab, "oslsm")) for lab in labels]
    assert np.mean([len(p) >= 2 for p in present]) > 0.4  # about half hold 2-3 classes (VOC-like)
    assert np.mean([len(k) >= 2 for k in kept]) > 0.15  # ... some two that both pass the filter
    assert sum(len(p - k) for p, k in zip(present, kept)) > 0.2 * len(labels)  # small objects dropped
    sizes = [int((lab == c).sum()) for lab, cs in zip(labels, present) for c in cs]
    assert min(sizes) < 0.01 * labels[0].size < 0.2 * labels[0].size < max(sizes)
    assert len({s.shape for s in STYLES.values()}) == 20
    assert len({tuple(round(x) for x in s.base) for s in STYLES.values()}) == 20


def test_backgrounds_correlate_with_the_main_class():
    rng = np.random.default_rng(0)
    for cls in (1, 7, 13, 20):
        scenes = Counter(choose_scene(cls, rng) for _ in range(2000))
        assert scenes[CLASS_SCENE[cls]] / 2000 == pytest.approx(SCENE_PREFERENCE, abs=0.04)
        assert len(scenes) == 4  # the other scenes still occur


def test_too_small_images_are_refused_by_params():
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["data"]["synthetic"]["height"] = 64
    with pytest.raises(ParamsError, match="data.synthetic.height"):
        params_from_dict(raw)
