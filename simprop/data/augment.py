"""The augment stage: build SegmentationClassAug from SBD and VOC2012.

Every image of SBD train + val gets its ``cls/*.mat`` class map as a single-channel PNG; where
VOC2012 ``SegmentationClass`` has a mask for the image (its trainval list), the VOC mask wins
("overwrites" SBD), read as palette indices so that void (255) is kept. Each image is written
once from the source that wins, in worker processes (``data.workers``; 0 = all cores), into a
temporary directory renamed to ``SegmentationClassAug`` only when every file is written.

Each label is checked on the way: readable, 2-D, non-empty, values in 0..20 and 255, and the
same size as its JPEG in ``VOCdevkit/VOC2012/JPEGImages``; otherwise the error names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from simprop.data.errors import LabelError
from simprop.data.io import (
    image_size,
    install_tree,
    read_id_list,
    read_palette_png,
    read_sbd_mat,
    write_label_png,
)
from simprop.data.layout import DataLayout
from simprop.data.progress import map_unordered, progress_bar


@dataclass(frozen=True)
class LabelSource:
    """Where the SegmentationClassAug label of one image comes from."""

    image_id: str
    kind: str  # "voc" (SegmentationClass PNG) or "sbd" (cls/*.mat)
    path: Path
    image: Path


def label_sources(layout: DataLayout) -> list[LabelSource]:
    """One source per image of SBD train/val and VOC trainval; VOC wins where both have a mask."""
    voc_ids = set(read_id_list(layout.voc_list("trainval")))
    sbd_ids = set(read_id_list(layout.sbd_list("train"))) | set(read_id_list(layout.sbd_list("val")))
    sources = []
    for image_id in sorted(voc_ids | sbd_ids):
        if image_id in voc_ids:
            path, kind = layout.voc_masks / f"{image_id}.png", "voc"
        else:
            path, kind = layout.sbd_masks / f"{image_id}.mat", "sbd"
        sources.append(LabelSource(image_id, kind, path, layout.image(image_id)))
    return sources


def convert_label(source: LabelSource, out_dir: Path) -> str:
    """Read, check and write one label as ``<out_dir>/<id>.png``; returns the source kind."""
    if not source.path.exists():
        raise LabelError(f"{source.path}: mask listed for image {source.image_id} is missing")
    label = read_palette_png(source.path) if source.kind == "voc" else read_sbd_mat(source.path)
    width, height = image_size(source.image)
    if label.shape != (height, width):
        raise LabelError(
            f"{source.path}: mask is {label.shape[1]}x{label.shape[0]} but its image {source.image} "
            f"is {width}x{height}"
        )
    write_label_png(out_dir / f"{source.image_id}.png", label)
    return source.kind


def build_segmentation_class_aug(layout: DataLayout, *, workers: int = 0, progress: bool = True) -> dict[str, int]:
    """Write ``<root>/SegmentationClassAug``; returns how many labels came from VOC and from SBD."""
    sources = label_sources(layout)
    counts = {"voc": 0, "sbd": 0}

    def build(tmp: Path) -> None:
        work = partial(convert_label, out_dir=tmp)
        with progress_bar(total=len(sources), desc="SegmentationClassAug", unit=" labels", enabled=progress) as bar:
            for kind in map_unordered(work, sources, workers, per_worker=64, chunksize=32):
                counts[kind] += 1
                bar.update()

    install_tree(layout.aug, build)
    return counts
