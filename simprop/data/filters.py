"""The small-object filter of PASCAL-5i (image, class) pairs (``splits.small_object_filter``).

* ``oslsm``: the binary class mask, resized with nearest-neighbour sampling to 1/32 of its size
  (``height // 32`` x ``width // 32``, at least 1 x 1), must have **more than 2** foreground pixels.
  Nearest-neighbour here samples each output pixel's centre, as PIL's ``NEAREST`` does: output row
  ``i`` reads input row ``floor((i + 0.5) * height / out_height)``.
* ``pfenet``: the class must cover **at least 2048** (= 2 * 32 * 32) pixels at full resolution.
* ``none``: every class present in the label map is kept.

Ignore pixels (255) are never foreground, so VOC's boundary bands count against small objects.
"""

from __future__ import annotations

import numpy as np

from simprop.data.voc import NUM_CLASSES

OSLSM_STRIDE = 32
OSLSM_MIN_SAMPLED = 3  # "more than 2 pixels" at 1/32 resolution
PFENET_MIN_PIXELS = 2 * 32 * 32
FILTERS = ("oslsm", "pfenet", "none")


def oslsm_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns that a nearest-neighbour resize to 1/32 of the size samples."""
    out_h, out_w = max(1, height // OSLSM_STRIDE), max(1, width // OSLSM_STRIDE)
    rows = ((np.arange(out_h) + 0.5) * height / out_h).astype(np.int64)
    cols = ((np.arange(out_w) + 0.5) * width / out_w).astype(np.int64)
    return rows, cols


def class_pixel_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class id 0..255: pixels at full resolution, and pixels at the OSLSM 1/32 sampling."""
    rows, cols = oslsm_grid(*label.shape)
    full = np.bincount(label.ravel(), minlength=256)
    sampled = np.bincount(label[np.ix_(rows, cols)].ravel(), minlength=256)
    return full, sampled


def passes(rule: str, pixels: int, sampled: int) -> bool:
    """Whether a class with ``pixels`` full-resolution and ``sampled`` 1/32 pixels is kept."""
    if rule == "oslsm":
        return sampled >= OSLSM_MIN_SAMPLED
    if rule == "pfenet":
        return pixels >= PFENET_MIN_PIXELS
    if rule == "none":
        return pixels > 0
    raise ValueError(f"unknown small-object filter {rule!r}; choose from {list(FILTERS)}")


def kept_classes(label: np.ndarray, rule: str) -> list[int]:
    """The class ids 1..20 of a label map that pass the filter ``rule``."""
    full, sampled = class_pixel_counts(label)
    return [c for c in range(1, NUM_CLASSES + 1) if full[c] and passes(rule, int(full[c]), int(sampled[c]))]


def mask_passes(mask: np.ndarray, rule: str) -> bool:
    """Whether a binary mask passes the filter ``rule``."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = oslsm_grid(*mask.shape)
    return passes(rule, int(mask.sum()), int(mask[np.ix_(rows, cols)].sum()))
