"""The embedded generated dataset: a miniature VOC2012 + SBD tree (``data.source: synthetic``).

It is written in exactly the on-disk layout of the two official archives (JPEGs, palette PNG
masks with 255 boundary bands, SBD ``cls/*.mat`` files holding the ``GTcls`` struct, the
ImageSets lists, SBD ``train.txt`` / ``val.txt`` and ``train_noval.txt``), so every later stage
runs the same code on it as on the real data.

What makes few-shot segmentation a real task on it:

* every class has its own shape family (ellipse, ring, star, cross, ...) and colour/texture,
  with intra-class variation in size, aspect, rotation, colour and texture frequency;
* about half the images hold objects of 2-3 different classes (1.7 classes per image on the
  default tree, VOC2012 has about 1.5), so often only the support says which one to segment;
  more co-occurrence than that makes every novel-class object a frequent *background* object
  of the training images, which a network learns to suppress;
* backgrounds come from four scene textures (sky, road, grass, indoor) whose choice correlates
  with the image's main class: the background cue that FBAF exploits exists;
* object sizes vary from tiny to large, so the small-object filter drops some (image, class)
  pairs. The main object of every image always passes the OSLSM filter (and the PFENet one
  unless the image is too small for it), and main classes are dealt round-robin within each
  pool, so every class has test and training images in every fold.

Set membership mimics the real archives: VOC images are split half train / half val (the
val half is the PASCAL-5i test pool); about 77% of VOC images are also in SBD (from both
halves, as in reality); SBD is split about 3:1 into train/val regardless of VOC; and
``train_noval.txt`` is SBD train without the VOC val images.

Everything is drawn from ``numpy.random.default_rng([seed, image index])``, so the tree is
byte-identical for the same params whatever the number of worker processes.
"""

from __future__ import annotations

import io
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from simprop.data.io import write_id_list
from simprop.data.layout import SBD_SUBDIR, VOC_SUBDIR
from simprop.data.progress import map_unordered, progress_bar
from simprop.data.synthetic_images import ImagePlan, plan_images, render_image
from simprop.voc import NUM_CLASSES, voc_palette


def sbd_gtcls(label: np.ndarray) -> dict:
    """The ``GTcls`` struct of an SBD ``cls/*.mat`` file for a class map."""
    from scipy import sparse

    edges = ndimage.maximum_filter(label, size=3) != ndimage.minimum_filter(label, size=3)
    present = [c for c in range(1, NUM_CLASSES + 1) if (label == c).any()]
    boundaries = np.empty((NUM_CLASSES, 1), dtype=object)
    empty = sparse.csc_matrix(label.shape, dtype=bool)
    for c in range(1, NUM_CLASSES + 1):
        boundaries[c - 1, 0] = sparse.csc_matrix(edges & (label == c)) if c in present else empty
    return {
        "Segmentation": label,
        "Boundaries": boundaries,
        "CategoriesPresent": np.array(present, np.uint8).reshape(-1, 1),
    }


@lru_cache(maxsize=1)
def _palette() -> tuple[int, ...]:
    return tuple(voc_palette())


MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by simprop.data.synthetic"


def mat_file_bytes(variables: dict) -> bytes:
    """A MATLAB v5 file (as SBD ships) with a fixed header text instead of the creation time,
    so that the generated tree is byte-identical from run to run."""
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, variables, do_compression=True)
    data = bytearray(buf.getvalue())
    data[:116] = MAT_HEADER_TEXT.ljust(116, b" ")  # the 116-byte descriptive text field
    return bytes(data)


def _write_image(plan: ImagePlan, params, raw: Path) -> None:
    rgb, label, voc_label = render_image(plan, params)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    (raw / VOC_SUBDIR / "JPEGImages" / f"{plan.image_id}.jpg").write_bytes(jpeg)
    if plan.sbd_split is not None:
        (raw / SBD_SUBDIR / "img" / f"{plan.image_id}.jpg").write_bytes(jpeg)
        (raw / SBD_SUBDIR / "cls" / f"{plan.image_id}.mat").write_bytes(mat_file_bytes({"GTcls": sbd_gtcls(label)}))
    if plan.voc_split is not None:
        mask = Image.fromarray(voc_label, mode="P")
        mask.putpalette(list(_palette()))
        mask.save(raw / VOC_SUBDIR / "SegmentationClass" / f"{plan.image_id}.png")


def write_synthetic_tree(raw: Path, params, *, workers: int = 1, progress: bool = False) -> dict[str, int]:
    """Write the generated VOC2012 + SBD tree under ``raw`` (``params``: data.synthetic).

    Returns the number of images in each list.
    """
    raw = Path(raw)
    plans = plan_images(params)
    for sub in (VOC_SUBDIR / "JPEGImages", VOC_SUBDIR / "SegmentationClass",
                VOC_SUBDIR / "ImageSets" / "Segmentation", SBD_SUBDIR / "img", SBD_SUBDIR / "cls"):  # fmt: skip
        (raw / sub).mkdir(parents=True, exist_ok=True)
    work = partial(_write_image, params=params, raw=raw)
    with progress_bar(total=len(plans), desc="generate", unit=" images", enabled=progress) as bar:
        for _ in map_unordered(work, plans, workers, per_worker=32, chunksize=8):
            bar.update()
    lists = {
        "voc_train": sorted(p.image_id for p in plans if p.voc_split == "train"),
        "voc_val": sorted(p.image_id for p in plans if p.voc_split == "val"),
        "sbd_train": sorted(p.image_id for p in plans if p.sbd_split == "train"),
        "sbd_val": sorted(p.image_id for p in plans if p.sbd_split == "val"),
    }
    voc_val = set(lists["voc_val"])
    lists["voc_trainval"] = sorted(lists["voc_train"] + lists["voc_val"])
    lists["train_noval"] = [i for i in lists["sbd_train"] if i not in voc_val]
    sets = raw / VOC_SUBDIR / "ImageSets" / "Segmentation"
    write_id_list(sets / "train.txt", lists["voc_train"])
    write_id_list(sets / "val.txt", lists["voc_val"])
    write_id_list(sets / "trainval.txt", lists["voc_trainval"])
    write_id_list(raw / SBD_SUBDIR / "train.txt", lists["sbd_train"])
    write_id_list(raw / SBD_SUBDIR / "val.txt", lists["sbd_val"])
    write_id_list(raw / "train_noval.txt", lists["train_noval"])
    return {name: len(ids) for name, ids in lists.items()}
