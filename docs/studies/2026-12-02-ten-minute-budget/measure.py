"""Best validation 1-shot mIoU a training had reached after its first E epochs, from the committed
run's validation curves (plots/train/val/<variant>/fold<i>/seed<s>.csv): mean over the 4 folds x 3
training seeds.  Read-only; run from the repository root:

    python3 docs/studies/2026-12-02-ten-minute-budget/measure.py
"""

from __future__ import annotations

import glob
import statistics

import pandas as pd

EPOCHS = (5, 8, 10, 12, 15)
VARIANTS = ("canet", "dpr", "fbaf", "dpr_fbaf", "simpropnet")

print("| variant | curves | " + " | ".join(f"best of first {e} epochs" for e in EPOCHS) + " |")
print("|---|---|" + "---|" * len(EPOCHS))
for variant in VARIANTS:
    curves = [pd.read_csv(f) for f in sorted(glob.glob(f"plots/train/val/{variant}/fold*/seed*.csv"))]
    cells = [statistics.mean(c[c.epoch <= e].val_miou.max() for c in curves) for e in EPOCHS]
    print(f"| {variant} | {len(curves)} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
