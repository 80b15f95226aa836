"""Pictures people would rather look at than read: mask overlays and qualitative panels."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from simprop.infra.atomic import replace_on_success

FOREGROUND_COLOUR = (255, 40, 40)
SUPPORT_COLOUR = (40, 200, 255)
IGNORE_COLOUR = (255, 255, 255)


def overlay(image: np.ndarray, mask: np.ndarray, colour=FOREGROUND_COLOUR, alpha: float = 0.5,
            ignore: np.ndarray | None = None) -> np.ndarray:
    """``image`` (uint8 [H,W,3]) with ``mask`` tinted and its border drawn; ``ignore`` in white."""
    out = image.astype(np.float32).copy()
    mask = mask.astype(bool)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    edge = mask & ~_erode(mask)
    out[edge] = colour
    if ignore is not None:
        out[ignore.astype(bool)] = IGNORE_COLOUR
    return out.clip(0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def save_qualitative(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """A grid: support | query | prediction | ground truth, one episode a row.

    Each row: ``support`` and ``query`` uint8 images, ``support_mask``, ``pred`` and
    ``label`` (episode label 0/1/255) arrays, and a ``caption``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("support", "query", "prediction", "ground truth")
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        label = row["label"]
        panels = (
            overlay(row["support"], row["support_mask"], SUPPORT_COLOUR),
            row["query"],
            overlay(row["query"], row["pred"]),
            overlay(row["query"], label == 1, ignore=label == 255),
        )
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c])
        axes[r, 0].set_ylabel(row.get("caption", ""), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure atomically (a killed stage never leaves a half-written image)
    and close it.  No "Software" metadata, so the same figure gives the same bytes."""
    import matplotlib.pyplot as plt


    path = Path(path)
    try:
        with replace_on_success(path, suffix=".tmp" + path.suffix) as tmp:  # savefig needs the suffix
            fig.savefig(tmp, dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
