"""The small-object filter of PASCAL-5i (image, class) pairs (``splits.small_object_filter``).

* ``oslsm``: **OSLSM's rule, exactly** (Shaban et al. 2017; ``OSLSM/code/ss_datalayer.py``
  ``_remove_small_objects`` calling ``OSLSM/code/util.py`` ``change_coordinates(mask, 32.0, 0.0)``,
  the rule the CANet / HSNet / SimPropNet lists come from). The binary class mask (``h x w``, float)
  is padded with ``pad = 15`` zero rows/columns at the top/left and with zeros at the bottom/right
  up to ``ceil((h + 30) / 32) * 32`` rows and ``ceil((w + 30) / 32) * 32`` columns, then resized with
  scikit-image ``resize(order=0, preserve_range=True, anti_aliasing=False)`` (plain nearest
  sampling: the 2017 scikit-image had no anti-aliasing; today's turns it on for float input unless
  told not to) to ``ceil((h + 30) / 32) x ceil((w + 30) / 32)``; the pair is kept when the sum is
  **> 2**. Output row ``i`` reads padded row ``32 i + 15.5`` rounded to ``32 i + 16``, i.e.
  original row ``32 i + 1``: the rule **samples the original rows and columns 32k + 1**
  (k = 0, 1, ...; 0-based indices) that exist, and keeps a class with at least 3 pixels there.
  (``change_coordinates`` skips the resize when the size would not change, which only happens for
  a 1 x 1 mask: then the sum is the mask's single pixel.) :func:`oslsm_downsample` is that
  computation literally; :func:`oslsm_grid` gives the sampled rows/columns so the splits stage
  counts every class of a label map in one pass (the tests check both agree on random masks).
* ``pfenet``: the class must cover **at least 2048** (= 2 * 32 * 32) pixels at full resolution
  (PFENet ``util/dataset.py`` ``make_dataset``: its approximation of OSLSM's rule).
* ``none``: every class present in the label map is kept.

Void pixels (255) are never foreground, so VOC's boundary bands count against small objects.
"""

from __future__ import annotations

import math

import numpy as np

from simprop.voc import NUM_CLASSES

OSLSM_STRIDE = 32
OSLSM_PAD = 15  # change_coordinates(mask, 32.0, 0.0): pad = int(-0.0 + (32 - 1) / 2)
OSLSM_FIRST = 1  # first original row/column sampled: padded 16 minus the 15 padded rows
OSLSM_MIN_SAMPLED = 3  # "sum > 2" at 1/32
# Smallest side with 3 sampled rows (1, 33, 65): images at least this big can hold a 3 x 3 patch
# of samples, so any object covering the middle of such an image can pass the OSLSM rule.
OSLSM_MIN_SIDE = OSLSM_FIRST + 2 * OSLSM_STRIDE + 1
PFENET_MIN_PIXELS = 2 * 32 * 32
FILTERS = ("oslsm", "pfenet", "none")


def oslsm_output_size(height: int, width: int) -> tuple[int, int]:
    """``(ceil((h + 30) / 32), ceil((w + 30) / 32))``: the size OSLSM resizes the padded mask to."""
    return (
        math.ceil((height + 2 * OSLSM_PAD) / OSLSM_STRIDE),
        math.ceil((width + 2 * OSLSM_PAD) / OSLSM_STRIDE),
    )


def oslsm_downsample(mask: np.ndarray) -> np.ndarray:
    """OSLSM's ``change_coordinates(mask, 32.0, 0.0)`` on a binary mask, step by step.

    Followed: ``OSLSM/code/util.py`` ``change_coordinates`` (pad, then scikit-image ``resize``
    with ``order=0, preserve_range=True``), with ``anti_aliasing=False`` spelt out because
    scikit-image >= 0.15 smooths float input before resizing unless told not to.
    """
    from skimage.transform import (
        resize,  # imported on use: scikit-image is slow to import
    )

    mask = np.asarray(mask, dtype=np.float32)
    height, width = mask.shape
    out_h, out_w = oslsm_output_size(height, width)
    if (out_h, out_w) == (height, width):  # change_coordinates returns the padded copy unresized
        return np.pad(mask, ((OSLSM_PAD, OSLSM_STRIDE * out_h - height - OSLSM_PAD),) * 2)
    padded = np.pad(
        mask,
        (
            (OSLSM_PAD, OSLSM_STRIDE * out_h - height - OSLSM_PAD),
            (OSLSM_PAD, OSLSM_STRIDE * out_w - width - OSLSM_PAD),
        ),
    )
    return resize(padded, (out_h, out_w), order=0, preserve_range=True, anti_aliasing=False)


def oslsm_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The original rows and columns OSLSM's rule samples: ``32k + 1`` inside the image.

    Summing a mask at ``np.ix_(rows, cols)`` equals ``oslsm_downsample(mask).sum()``: the output
    pixels that read the bottom/right zero padding add nothing. A 1 x 1 mask is kept unresized
    by OSLSM (see the module docstring), so its one pixel is its sample.
    """
    if height == 1 and width == 1:
        return np.array([0]), np.array([0])
    rows = np.arange(OSLSM_FIRST, height, OSLSM_STRIDE)
    cols = np.arange(OSLSM_FIRST, width, OSLSM_STRIDE)
    return rows, cols


def class_pixel_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class id 0..255: pixels at full resolution, and pixels on the OSLSM 1/32 sampling grid."""
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
    """Whether a binary mask passes the filter ``rule`` (``oslsm``: :func:`oslsm_downsample`'s sum > 2)."""
    mask = np.asarray(mask, dtype=bool)
    if rule == "oslsm":
        return float(oslsm_downsample(mask).sum()) > OSLSM_MIN_SAMPLED - 1
    return passes(rule, int(mask.sum()), 0)
