"""PASCAL VOC classes, the PASCAL-5i folds and the VOC colour palette."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""Index ``c - 1`` holds the name of the 1-based VOC class id ``c``."""

NUM_CLASSES = len(CLASS_NAMES)
BACKGROUND = 0
IGNORE = 255  # VOC "void": object boundaries and difficult regions
NUM_FOLDS = 4
CLASSES_PER_FOLD = NUM_CLASSES // NUM_FOLDS


def class_name(class_id: int) -> str:
    """Name of a 1-based VOC class id."""
    if not 1 <= class_id <= NUM_CLASSES:
        raise ValueError(f"VOC class ids are 1..{NUM_CLASSES}, got {class_id}")
    return CLASS_NAMES[class_id - 1]


def fold_classes(fold: int) -> tuple[int, ...]:
    """The five 1-based class ids held out for testing in PASCAL-5i fold ``fold`` (5i+1 .. 5i+5)."""
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"PASCAL-5i folds are 0..{NUM_FOLDS - 1}, got {fold}")
    first = CLASSES_PER_FOLD * fold + 1
    return tuple(range(first, first + CLASSES_PER_FOLD))


def train_classes(fold: int) -> tuple[int, ...]:
    """The fifteen class ids a model for fold ``fold`` is trained on."""
    held_out = set(fold_classes(fold))
    return tuple(c for c in range(1, NUM_CLASSES + 1) if c not in held_out)


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map as a flat ``[r, g, b, r, g, b, ...]`` list (PIL's ``putpalette``).

    Colour of index ``i``: the bits of ``i`` are dealt out, three at a time, to the high bits of
    red, green and blue (the devkit's ``labelcolormap``). Index 255 (void) is (224, 224, 192).
    """
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        code = index
        for bit in range(8):
            r |= ((code >> 0) & 1) << (7 - bit)
            g |= ((code >> 1) & 1) << (7 - bit)
            b |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette += [r, g, b]
    return palette
