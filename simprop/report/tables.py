"""The rows of the paper's Tables 3, 4 and 5 (ours beside the paper's numbers) and of the
support-use controls, from the loaded metrics; the tidy table CSVs.

Numbers: a fold's cell is the mean ± sample std (ddof=1) over the test seeds of that fold's
mIoU.  The "mean" column averages the folds *per seed* and then takes mean ± std over seeds,
so its std is the spread of the 4-split mean over test sets.  When not every fold was run,
the mean covers the folds that were, and the paper's mean is recomputed over the same splits
(noted in the table).  The identical-input test (Table 5) has one value per fold (all test
pairs, no seeds), hence no std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from simprop import paper
from simprop.engine.metrics import mean_std
from simprop.infra.atomic import write_text
from simprop.params import Params
from simprop.report.results import RunResult
from simprop.voc import split_name

CSV_COLUMNS = ["table", "method", "shots", "split", "ours_mean", "ours_std", "paper", "diff", "note"]
ALL_FOLDS = (0, 1, 2, 3)


@dataclass
class Row:
    """One row of a tidy table CSV (and one cell triple of the markdown tables)."""

    table: str
    method: str
    shots: int
    split: str
    ours_mean: float | None
    ours_std: float | None
    paper: float | None
    note: str = ""

    @property
    def diff(self) -> float | None:
        if self.ours_mean is None or self.paper is None:
            return None
        return self.ours_mean - self.paper

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "method": self.method,
            "shots": self.shots,
            "split": self.split,
            "ours_mean": self.ours_mean,
            "ours_std": self.ours_std,
            "paper": self.paper,
            "diff": None if self.diff is None else round(self.diff, 6) + 0.0,  # no -0.0000
            "note": self.note,
        }


# A fold getter returns (per-seed values, or a single value when there are no seeds) for a fold,
# or None when that fold has no result.
FoldGetter = Callable[[int], "tuple[list[float] | None, float, float | None] | None"]


def shot_getter(results: dict, variant: str, shots: int) -> FoldGetter:
    """Per-fold (per-seed mIoUs, mean, std) of ``shots``-shot evaluation of ``variant``."""

    def get(fold: int):
        res = results.get((variant, fold))
        entry = res.shot(shots) if res else None
        if entry is None:
            return None
        seeds = [k for k in entry if k.startswith("seed") and isinstance(entry[k], dict)]
        per_seed = [entry[k]["miou"] for k in sorted(seeds, key=lambda k: int(k[4:]))] or None
        return per_seed, entry["miou_mean"], entry.get("miou_std")

    return get


def _identical_getter(results: dict, variant: str) -> FoldGetter:
    def get(fold: int):
        res = results.get((variant, fold))
        if res is None or "identical" not in res.evaluate:
            return None
        return None, res.evaluate["identical"]["miou"], None

    return get


def _gain_getter(a: FoldGetter, b: FoldGetter) -> FoldGetter:
    def get(fold: int):
        ra, rb = a(fold), b(fold)
        if ra is None or rb is None:
            return None
        return None, ra[1] - rb[1], None

    return get


def method_rows(
    table: str,
    method: str,
    shots: int,
    getter: FoldGetter,
    paper_row: paper.PaperRow | None,
    folds: Sequence[int],
) -> list[Row]:
    """Rows split-1..split-4 and mean for one method; folds not run have ours = None."""
    rows = []
    done: list[tuple[int, Any]] = []
    for fold in ALL_FOLDS:
        got = getter(fold) if fold in folds else None
        ref = paper_row.split(fold) if paper_row else None
        if got is None:
            rows.append(Row(table, method, shots, split_name(fold), None, None, ref))
            continue
        done.append((fold, got))
        rows.append(Row(table, method, shots, split_name(fold), got[1], got[2], ref))
    rows.append(_mean_row(table, method, shots, done, paper_row))
    return rows


def _mean_row(table: str, method: str, shots: int, done: list, paper_row: paper.PaperRow | None) -> Row:
    if not done:
        return Row(table, method, shots, "mean", None, None, paper_row.mean if paper_row else None)
    folds = [f for f, _ in done]
    per_seed = [got[0] for _, got in done]
    if all(p is not None for p in per_seed) and len({len(p) for p in per_seed}) == 1:
        # average the folds per seed, then mean ± std over seeds (test sets)
        fold_means = [sum(vals) / len(vals) for vals in zip(*per_seed)]
        mean, std = mean_std(fold_means)
        if len(fold_means) < 2:
            std = None
    else:
        mean, std = sum(got[1] for _, got in done) / len(done), None
    note = ""
    ref = paper_row.mean if paper_row else None
    if tuple(folds) != ALL_FOLDS:
        names = ", ".join(split_name(f) for f in folds)
        note = f"mean over {names} only; paper mean recomputed over the same splits"
        if paper_row:
            ref = sum(paper_row.split(f) for f in folds) / len(folds)
    return Row(table, method, shots, "mean", mean, std, ref, note)


def table_rows(params: Params, results: dict[tuple[str, int], RunResult]) -> dict[str, list[Row]]:
    """The rows of Tables 3, 4 and 5 (``{"table3": [...], ...}``)."""
    variants = params.train.variants
    folds = params.train.folds
    shots_run = params.evaluate.shots

    def run_or_none(variant: str, shots: int, getter: FoldGetter) -> FoldGetter:
        if variant in variants and shots in shots_run:
            return getter
        return lambda fold: None

    out: dict[str, list[Row]] = {"table3": [], "table4": [], "table5": []}
    for (variant, shots), ref in paper.TABLE3.items():
        getter = run_or_none(variant, shots, shot_getter(results, variant, shots))
        out["table3"] += method_rows("3", variant, shots, getter, ref, folds)
    for variant, ref in paper.TABLE4.items():
        getter = run_or_none(variant, 1, shot_getter(results, variant, 1))
        out["table4"] += method_rows("4", variant, 1, getter, ref, folds)
    identical = params.evaluate.identical_input
    getters = {}
    for variant in paper.METHOD_LABELS:
        if variant not in paper.TABLE5 and variant not in variants:
            continue
        getter = _identical_getter(results, variant) if identical and variant in variants else (lambda f: None)
        getters[variant] = getter
        out["table5"] += method_rows("5", variant, 1, getter, paper.TABLE5.get(variant), folds)
    gain = _gain_getter(getters["simpropnet"], getters["canet"])
    out["table5"] += method_rows("5", "simpropnet-canet", 1, gain, paper.TABLE5_GAIN_OVER_CANET, folds)
    return out


def write_csv(rows: list[Row], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame([r.as_dict() for r in rows], columns=CSV_COLUMNS)
    write_text(path, frame.to_csv(index=False, float_format="%.4f"))


def _fold_mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def support_use_rows(params: Params, results: dict[tuple[str, int], RunResult]) -> list[dict]:
    """One row per (variant, fold) and a mean-over-folds row per variant, from the evaluate records."""
    rows = []
    for variant in params.train.variants:
        per_fold = []
        for fold in params.train.folds:
            res = results.get((variant, fold))
            if res is None:
                continue
            ev = res.evaluate
            ref = ev.get("reference", {})
            per_fold.append({
                "variant": variant, "fold": fold,
                "shot1": (ev.get("shot1") or {}).get("miou_mean"),
                "mismatched": (ev.get("mismatched") or {}).get("miou_mean"),
                "shot5": (ev.get("shot5") or {}).get("miou_mean"),
                "identical": (ev.get("identical") or {}).get("miou"),
                "matcher1": ((ev.get("matcher") or {}).get("shot1") or {}).get("miou_mean"),
                "matcher5": ((ev.get("matcher") or {}).get("shot5") or {}).get("miou_mean"),
                "all_foreground": ref.get("all_foreground_miou"),
                "untrained": ref.get("untrained_miou"),
            })  # fmt: skip
        rows += per_fold
        if per_fold:
            keys = [k for k in per_fold[0] if k not in ("variant", "fold")]
            rows.append({"variant": variant, "fold": "mean", **{k: _fold_mean([r[k] for r in per_fold]) for k in keys}})
    for row in rows:
        minus = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
        row["support_gain"] = minus(row["shot1"], row["mismatched"])
        row["shot5_gain"] = minus(row["shot5"], row["shot1"])
        row["identical_gain"] = minus(row["identical"], row["shot1"])
        row["matcher_gain"] = minus(row["shot1"], row["matcher1"])
    return rows
