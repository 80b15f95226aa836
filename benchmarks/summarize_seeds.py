"""Training-seed noise of the default setup, from a validation-only sweep.

Reads the JSON lines that ``benchmarks/gpu/sweep.py`` writes (one line per training run: variant,
fold, ``train.seed``, and the trained checkpoint's validation 1-shot / mismatched-support /
5-shot / identical-input mIoU and the prototype matcher's) and prints, as Markdown:

* per variant and fold: mean ± sample std (ddof=1) over the seeds of the validation 1-shot mIoU
  and of the support gain (1-shot minus mismatched support), and its minimum;
* per variant: the same averaged over the folds, and in how many of the (fold, seed) trainings
  the support gain reaches 10 points (issue 9's bar) and the 1-shot mIoU reaches the matcher's.

Several files (or runs with different overrides besides ``train.seed``) are summarized per
setting, then side by side.

Only validation episodes are involved (the sweep never reads a test episode), so this measures
how far apart two trainings of the same cell land, not a test score.

    python3 benchmarks/summarize_seeds.py docs/studies/2026-11-26-training-seeds/cpu_sweep_seeds.jsonl [more.jsonl ...]

(the seed sweep of docs/studies/2026-11-26-training-seeds.md, whose ``cpu_sweep_seeds.md`` it wrote).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

VARIANTS = ("canet", "dpr", "fbaf", "dpr_fbaf", "simpropnet")
GAIN_BAR = 10.0


def read_runs(path: Path) -> list[dict]:
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "error" in row:
            raise SystemExit(f"{path}:{number}: run {row.get('id')} failed:\n{row['error']}")
        runs.append(row)
    if not runs:
        raise SystemExit(f"{path}: no runs")
    return runs


def mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.1f} ± {std:.1f}"


def gain(row: dict) -> float:
    """Support gain: 1-shot minus mismatched-support validation mIoU."""
    return row["v1"] - row["vmm"]


def by_cell(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """The rows of each (variant, fold), i.e. one list of seeds per cell."""
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        cells[(row["variant"], int(row["fold"]))].append(row)
    return cells


def setting(row: dict) -> str:
    """The run's overrides other than the seed, e.g. ``train.lr_schedule=poly`` (or ``defaults``)."""
    rest = {k: v for k, v in sorted(row["set"].items()) if k != "train.seed"}
    return ", ".join(f"{k}={v}" for k, v in rest.items()) or "defaults"


def summarize_all(runs: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in runs:
        groups[setting(row)].append(row)
    parts = [f"### {name}\n\n{summarize(rows)}" for name, rows in groups.items()]
    if len(groups) > 1:
        lines = ["### Side by side (mean over folds and seeds)", "",
                 "| variant | " + " | ".join(f"{name}: 1-shot / gain / std of 1-shot over seeds" for name in groups) + " |",
                 "|---|" + "---|" * len(groups)]
        for variant in VARIANTS:
            cells = []
            for rows in groups.values():
                mine = [r for r in rows if r["variant"] == variant]
                if not mine:
                    cells.append("—")
                    continue
                stds = [statistics.stdev(r["v1"] for r in seeds) for seeds in by_cell(mine).values() if len(seeds) > 1]
                spread = f"{statistics.fmean(stds):.1f}" if stds else "—"
                cells.append(f"{statistics.fmean(r['v1'] for r in mine):.1f} / "
                             f"{statistics.fmean(gain(r) for r in mine):.1f} / {spread}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def summarize(runs: list[dict]) -> str:
    cells = by_cell(runs)
    variants = [v for v in VARIANTS if any(v == key[0] for key in cells)]
    folds = sorted({key[1] for key in cells})
    seeds = sorted({row["set"].get("train.seed", 0) for row in runs})
    lines = [
        f"Validation episodes only; training seeds {seeds}; mean ± std (ddof=1) over the seeds.",
        "",
        "| variant | fold | seeds | 1-shot | support gain | min gain | 5-shot gain | identical gain | matcher 1-shot |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    overall = []
    for variant in variants:
        per_variant = []
        for fold in folds:
            rows = cells.get((variant, fold), [])
            if not rows:
                continue
            per_variant.extend(rows)
            gains = [gain(r) for r in rows]
            lines.append(
                f"| {variant} | {fold} | {len(rows)} | {mean_std([r['v1'] for r in rows])} | "
                f"{mean_std(gains)} | {min(gains):+.1f} | {mean_std([r['v5'] - r['v1'] for r in rows])} | "
                f"{mean_std([r['vid'] - r['v1'] for r in rows])} | {statistics.fmean(r['m1'] for r in rows):.1f} |"
            )
        gains = [gain(r) for r in per_variant]
        reached = sum(g >= GAIN_BAR for g in gains)
        above = sum(r["v1"] >= r["m1"] for r in per_variant)
        overall.append(
            f"| {variant} | {statistics.fmean(r['v1'] for r in per_variant):.1f} | "
            f"{statistics.fmean(gains):.1f} | {reached} / {len(gains)} | {above} / {len(per_variant)} | "
            f"{statistics.fmean(r['m1'] for r in per_variant):.1f} |"
        )
    lines += [
        "",
        "Per variant, over every (fold, seed) training:",
        "",
        f"| variant | mean 1-shot | mean support gain | trainings with gain >= {GAIN_BAR:g} | trainings >= matcher | matcher 1-shot |",
        "|---|---|---|---|---|---|",
        *overall,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", type=Path, nargs="+", help="JSON lines written by benchmarks/gpu/sweep.py")
    args = parser.parse_args(argv)
    sys.stdout.write(summarize_all([row for path in args.sweeps for row in read_runs(path)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
