"""Rebuild docs/images/segment_overlay.png: the README's `simprop segment` example.

Run from the repository root after the default `dvc repro` (it needs the generated data and
models/dpr/fold0/seed0/best.pt; fold 0 never trained on class 1, aeroplane):

    python3 docs/make_segment_figure.py

It runs exactly the README's command through the Python API, then puts the two supports (class
mask outlined in cyan) beside the two overlays `simprop segment` wrote (prediction in red).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from simprop.engine.visualize import SUPPORT_COLOUR, overlay
from simprop.segment.api import segment

IMAGES = Path("data/raw/VOCdevkit/VOC2012/JPEGImages")
LABELS = Path("data/SegmentationClassAug")
SUPPORTS = ("2007_000006", "2010_000371")
QUERIES = ("2007_000040", "2010_000415")
CLASS_ID = 1
OUT = Path("docs/images/segment_overlay.png")


def main() -> None:
    supports = [(IMAGES / f"{s}.jpg", LABELS / f"{s}.png") for s in SUPPORTS]
    panels = []
    for image_path, label_path in supports:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = np.asarray(Image.open(label_path)) == CLASS_ID
        panels.append(overlay(image, mask, colour=SUPPORT_COLOUR, alpha=0.25))
    with tempfile.TemporaryDirectory() as tmp:
        results = segment(
            "models/dpr/fold0/seed0/best.pt", supports, [IMAGES / f"{q}.jpg" for q in QUERIES], Path(tmp) / "out",
            class_id=CLASS_ID, variant="dpr", device="cpu", progress=False,
        )  # fmt: skip
        for result in results:
            panels.append(np.asarray(Image.open(result.overlay).convert("RGB")))
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, 4, 3), 255, np.uint8)
    row = []
    for panel in panels:
        padded = np.full((height, panel.shape[1], 3), 255, np.uint8)
        padded[: panel.shape[0]] = panel
        row += [padded, gap]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    montage = Image.fromarray(np.concatenate(row[:-1], axis=1))
    montage.resize((montage.width * 2, montage.height * 2), Image.NEAREST).save(OUT)  # small images: 2x
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
