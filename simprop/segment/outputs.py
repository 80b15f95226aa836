"""What ``simprop segment`` writes: the mask PNG and the overlay of every query.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

OVERLAY_COLOUR = (255, 40, 40)


OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class SegmentResult:
    """One segmented query."""

    query: Path
    mask: Path  # <out_dir>/<stem>_mask.png
    overlay: Path  # <out_dir>/<stem>_overlay.png
    width: int
    height: int
    foreground_fraction: float  # share of the query's pixels predicted as foreground


def overlay_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the foreground tinted and its border drawn in the overlay colour."""
    out = image.astype(np.float32).copy()
    colour = np.array(OVERLAY_COLOUR, dtype=np.float32)
    out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * colour
    border = mask & ~binary_erosion(mask, iterations=max(1, min(image.shape[:2]) // 150))
    out[border] = colour
    return out.round().clip(0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
