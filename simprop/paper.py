"""The SimPropNet paper's numbers (PASCAL-5i, mIoU %, ResNet-50) as data.

Source: ``shared/paper/simpropnet-paper.txt`` Tables 3, 4 and 5, also listed in
``shared/reference/protocol.md`` §7.  Each entry is ``(split-1, split-2, split-3, split-4, mean)``
with the mean as printed in the paper (it can differ from the mean of the four printed splits in
the last digit: the paper rounded before averaging or after, it does not say).

Folds 0..3 are the paper's split-1..split-4.
"""

from __future__ import annotations

from typing import NamedTuple


class PaperRow(NamedTuple):
    splits: tuple[float, float, float, float]
    mean: float

    def split(self, fold: int) -> float:
        return self.splits[fold]


def _row(s1: float, s2: float, s3: float, s4: float, mean: float) -> PaperRow:
    return PaperRow((s1, s2, s3, s4), mean)


# Table 3: one-shot and five-shot mIoU, keyed by (variant, shots).
TABLE3: dict[tuple[str, int], PaperRow] = {
    ("simpropnet", 1): _row(54.86, 67.33, 54.52, 52.02, 57.19),
    ("simpropnet", 5): _row(57.20, 68.50, 58.40, 56.05, 60.04),
    ("canet", 1): _row(50.41, 63.02, 46.09, 47.46, 51.75),
    ("canet", 5): _row(52.27, 65.29, 47.15, 50.50, 53.81),
}

# Table 4: ablation of the components, one-shot, keyed by variant.
TABLE4: dict[str, PaperRow] = {
    "canet": _row(50.41, 63.02, 46.09, 47.46, 51.75),
    "dpr": _row(52.69, 66.57, 53.10, 51.23, 55.89),
    "fbaf": _row(54.16, 66.71, 49.11, 52.00, 55.50),
    "dpr_fbaf": _row(54.08, 67.29, 54.05, 52.93, 57.09),
    "simpropnet": _row(54.86, 67.33, 54.52, 52.02, 57.19),
}

# Table 5 (and Table 2): identical input, support = query, one-shot, keyed by variant.
TABLE5: dict[str, PaperRow] = {
    "simpropnet": _row(71.24, 82.09, 74.97, 77.15, 76.36),
    "canet": _row(54.51, 63.98, 48.20, 52.76, 54.86),
}
# Table 5's "ΔCANet" row: SimPropNet minus CANet on identical inputs.
TABLE5_GAIN_OVER_CANET: PaperRow = _row(16.73, 18.11, 26.77, 24.39, 21.50)

METHOD_LABELS: dict[str, str] = {
    "canet": "CANet (baseline)",
    "dpr": "DPr",
    "fbaf": "FBAF",
    "dpr_fbaf": "DPr + FBAF",
    "simpropnet": "SimPropNet (DPr + FBAF + ICA)",
}


def method_label(variant: str) -> str:
    return METHOD_LABELS.get(variant, variant)
