"""PASCAL VOC classes, the PASCAL-5i folds and the VOC colour palette."""

from __future__ import annotations

# The class list and fold split live in simprop.voc (shared with metrics and reports); the data
# stages use these names for them.
from simprop.voc import IGNORE_INDEX as IGNORE  # noqa: E402  VOC "void": boundaries, difficult regions
from simprop.voc import NUM_CLASSES, NUM_FOLDS, class_name, fold_classes, train_classes  # noqa: E402,F401
from simprop.voc import VOC_CLASSES as CLASS_NAMES  # noqa: E402

BACKGROUND = 0
CLASSES_PER_FOLD = NUM_CLASSES // NUM_FOLDS


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
