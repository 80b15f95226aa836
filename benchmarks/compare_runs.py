"""Committed runs side by side: each (variant, fold)'s 1-shot mIoU and support gain in several commits.

Reads ``metrics/evaluate/`` from git history (the layouts: ``<variant>/fold<i>/seed<s>.json``, of
which the first training seed ``--seed``, and the older ``<variant>/fold<i>.json`` and
``<variant>_fold<i>.json``), so runs of the same code up to float summation order (another
thread count, a reordered but equal convolution) can be read as draws of one training: per
variant, each run's mean 1-shot mIoU over the folds, their mean and range, and how many folds
reach a support gain of ``--bar`` points; per cell, the range over the runs.

Usage: ``python3 benchmarks/compare_runs.py df79436 d13fb3b HEAD [--bar 10] [--out runs.md] [--repo .]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("canet", "dpr", "fbaf", "dpr_fbaf", "simpropnet")
FOLDS = (0, 1, 2, 3)


def read_record(repo: Path, rev: str, variant: str, fold: int, seed: int = 0) -> dict:
    """The evaluate record of (variant, fold[, training seed]) at ``rev``; exits naming them if no layout has it."""
    for path in (f"metrics/evaluate/{variant}/fold{fold}/seed{seed}.json", f"metrics/evaluate/{variant}/fold{fold}.json",
                 f"metrics/evaluate/{variant}_fold{fold}.json"):  # fmt: skip
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
        if shown.returncode == 0:
            return json.loads(shown.stdout)
    raise SystemExit(f"{rev}: no metrics/evaluate record for {variant} fold {fold}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="+", help="git revisions holding a committed run")
    parser.add_argument("--bar", type=float, default=10.0, help="support-gain bar in mIoU points")
    parser.add_argument("--seed", type=int, default=0, help="the training seed read where runs have replicates")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repo", type=Path, default=ROOT, help="git repository (default: this one)")
    args = parser.parse_args()
    cells = {(rev, v, f): read_record(args.repo, rev, v, f, args.seed) for rev in args.revs for v in VARIANTS for f in FOLDS}
    one_shot = {k: r["shot1"]["miou_mean"] for k, r in cells.items()}
    gain = {k: r["support_use"]["support_gain"] for k, r in cells.items()}
    lines = [f"Runs: {', '.join(args.revs)} (1-shot mIoU = mean over the test sets; support gain = 1-shot - mismatched support)", ""]
    lines += ["| variant | " + " | ".join(f"{rev} mean 1-shot" for rev in args.revs)
              + " | mean over runs | range | " + " | ".join(f"{rev} folds gain >= {args.bar:g}" for rev in args.revs) + " |"]
    lines += ["|---" * (3 + 2 * len(args.revs)) + "|"]
    for v in VARIANTS:
        means = [sum(one_shot[(rev, v, f)] for f in FOLDS) / len(FOLDS) for rev in args.revs]
        passing = [sum(gain[(rev, v, f)] >= args.bar for f in FOLDS) for rev in args.revs]
        lines.append(f"| {v} | " + " | ".join(f"{m:.2f}" for m in means)
                     + f" | {sum(means) / len(means):.2f} | {max(means) - min(means):.2f} | "
                     + " | ".join(f"{p} / {len(FOLDS)}" for p in passing) + " |")
    lines += ["", "| variant | fold | 1-shot over the runs | range | support gain over the runs | min gain |", "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        for f in FOLDS:
            shots = [one_shot[(rev, v, f)] for rev in args.revs]
            gains = [gain[(rev, v, f)] for rev in args.revs]
            lines.append(f"| {v} | {f} | " + " / ".join(f"{x:.2f}" for x in shots) + f" | {max(shots) - min(shots):.2f} | "
                         + " / ".join(f"{g:+.2f}" for g in gains) + f" | {min(gains):+.2f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
