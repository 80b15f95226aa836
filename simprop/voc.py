"""PASCAL VOC class names, the PASCAL-5i fold split (protocol.md §2) and the VOC colour palette.

The one place for these names: data, metrics, reports and analyses import them from here.

Class ids are the 1-based VOC ids used in the label PNGs (0 is background,
255 is void).  Fold ``i`` holds out classes ``5i+1 .. 5i+5`` for testing; papers
call folds 0..3 "split-1".."split-4".
"""

from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""The 20 VOC object classes; ``VOC_CLASSES[c - 1]`` is the name of class id ``c``."""

NUM_CLASSES = len(VOC_CLASSES)
NUM_FOLDS = 4
IGNORE_INDEX = 255
"""VOC "void": object boundaries and difficult regions, never scored."""
BACKGROUND = 0
CLASSES_PER_FOLD = NUM_CLASSES // NUM_FOLDS


def class_name(class_id: int) -> str:
    """Name of the 1-based VOC class id (``1 -> "aeroplane"``)."""
    class_id = int(class_id)
    if not 1 <= class_id <= NUM_CLASSES:
        raise ValueError(f"VOC class id must be in 1..{NUM_CLASSES}, got {class_id}")
    return VOC_CLASSES[class_id - 1]


def class_id(name: str) -> int:
    """1-based VOC id of a class name (``"aeroplane" -> 1``)."""
    try:
        return VOC_CLASSES.index(name) + 1
    except ValueError:
        raise ValueError(f"unknown VOC class {name!r}; known: {list(VOC_CLASSES)}") from None


def _check_fold(fold: int) -> int:
    fold = int(fold)
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"PASCAL-5i fold must be in 0..{NUM_FOLDS - 1}, got {fold}")
    return fold


def fold_classes(fold: int) -> tuple[int, ...]:
    """The five test class ids of a fold: ``5*fold+1 .. 5*fold+5``."""
    fold = _check_fold(fold)
    return tuple(range(5 * fold + 1, 5 * fold + 6))


def train_classes(fold: int) -> tuple[int, ...]:
    """The fifteen training class ids of a fold (all classes not tested in it)."""
    test = set(fold_classes(fold))
    return tuple(c for c in range(1, NUM_CLASSES + 1) if c not in test)


def split_name(fold: int) -> str:
    """Paper naming of a fold: ``0 -> "split-1"``."""
    return f"split-{_check_fold(fold) + 1}"


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
