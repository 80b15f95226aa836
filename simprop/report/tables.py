"""The rows of the paper's Tables 3, 4 and 5 (ours beside the paper's numbers) and of the
support-use controls, from the loaded metrics; the tidy table CSVs.

Numbers: a training replicate's (fold, seed) value is the mean over the fold's test sets of its
mIoU.  A fold's cell is the mean ± sample std (ddof=1) over the **training seeds**
(``train.seeds``) of those values: the spread of one training, the one that decides whether a
difference between variants is real (:mod:`simprop.report.claims`).  Beside it, ``test_std`` is
the std over the test sets (ddof=1), averaged over the training seeds: the sampling noise of the
fixed test episodes.  The "mean" column averages the folds per training seed, then takes mean ±
std over the training seeds (and the test-set std of the fold average, averaged over seeds).
With one training seed there is no spread (``None``).  When not every fold was run, the mean
covers the folds that were, and the paper's mean is recomputed over the same splits (noted in
the table).  The identical-input test (Table 5) has one value per (fold, seed): all test pairs,
no test sets, so no test-set std.
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

CSV_COLUMNS = ["table", "method", "shots", "split", "ours_mean", "ours_std", "test_std", "train_seeds", "paper",
               "diff", "note"]  # fmt: skip
ALL_FOLDS = (0, 1, 2, 3)


@dataclass
class Row:
    """One row of a tidy table CSV (and one cell triple of the markdown tables).

    ``ours_std``: std over the training seeds (``None`` with one seed); ``test_std``: std over the
    test sets, averaged over the training seeds."""

    table: str
    method: str
    shots: int
    split: str
    ours_mean: float | None
    ours_std: float | None
    paper: float | None
    note: str = ""
    test_std: float | None = None
    train_seeds: int = 0

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
            "test_std": self.test_std,
            "train_seeds": self.train_seeds,
            "paper": self.paper,
            "diff": None if self.diff is None else round(self.diff, 6) + 0.0,  # no -0.0000
            "note": self.note,
        }


@dataclass
class Cell:
    """One fold's values: per training seed, the value and (when there are test sets) the value
    of each test set."""

    per_seed: list[float]
    per_test_set: list[list[float]] | None = None

    @property
    def mean(self) -> float:
        return sum(self.per_seed) / len(self.per_seed)

    @property
    def seed_std(self) -> float | None:
        return mean_std(self.per_seed)[1] if len(self.per_seed) > 1 else None

    @property
    def test_std(self) -> float | None:
        if not self.per_test_set or any(len(t) < 2 for t in self.per_test_set):
            return None
        return sum(mean_std(t)[1] for t in self.per_test_set) / len(self.per_test_set)


# A fold getter returns the fold's Cell, or None when that fold has no result.
FoldGetter = Callable[[int], "Cell | None"]


def _test_sets(entry: dict) -> list[float]:
    seeds = [k for k in entry if k.startswith("seed") and isinstance(entry[k], dict)]
    return [entry[k]["miou"] for k in sorted(seeds, key=lambda k: int(k[4:]))]


def shot_getter(results: dict, variant: str, shots: int, seeds: Sequence[int]) -> FoldGetter:
    """Per-fold :class:`Cell` of the ``shots``-shot mIoU of ``variant`` over the training ``seeds``."""

    def get(fold: int):
        runs = [results.get((variant, fold, s)) for s in seeds]
        entries = [r.shot(shots) if r else None for r in runs]
        if not entries or any(e is None for e in entries):
            return None
        return Cell([e["miou_mean"] for e in entries], [_test_sets(e) for e in entries])

    return get


def _identical_getter(results: dict, variant: str, seeds: Sequence[int]) -> FoldGetter:
    def get(fold: int):
        runs = [results.get((variant, fold, s)) for s in seeds]
        if not runs or any(r is None or "identical" not in r.evaluate for r in runs):
            return None
        return Cell([r.evaluate["identical"]["miou"] for r in runs])

    return get


def _gain_getter(a: FoldGetter, b: FoldGetter) -> FoldGetter:
    """The difference a - b per training seed (paired by seed)."""

    def get(fold: int):
        ra, rb = a(fold), b(fold)
        if ra is None or rb is None:
            return None
        return Cell([x - y for x, y in zip(ra.per_seed, rb.per_seed)])

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
    done: list[tuple[int, Cell]] = []
    for fold in ALL_FOLDS:
        got = getter(fold) if fold in folds else None
        ref = paper_row.split(fold) if paper_row else None
        if got is None:
            rows.append(Row(table, method, shots, split_name(fold), None, None, ref))
            continue
        done.append((fold, got))
        rows.append(Row(table, method, shots, split_name(fold), got.mean, got.seed_std, ref, "", got.test_std,
                        len(got.per_seed)))  # fmt: skip
    rows.append(_mean_row(table, method, shots, done, paper_row))
    return rows


def _mean_row(table: str, method: str, shots: int, done: list[tuple[int, Cell]], paper_row: paper.PaperRow | None) -> Row:
    if not done:
        return Row(table, method, shots, "mean", None, None, paper_row.mean if paper_row else None)
    folds = [f for f, _ in done]
    cells = [c for _, c in done]
    # the folds averaged per training seed, then mean ± std over the training seeds
    fold_avg = Cell(
        [sum(vals) / len(vals) for vals in zip(*(c.per_seed for c in cells))],
        [[sum(v) / len(v) for v in zip(*tests)] for tests in zip(*(c.per_test_set for c in cells))]
        if all(c.per_test_set for c in cells) else None,
    )  # fmt: skip
    note = ""
    ref = paper_row.mean if paper_row else None
    if tuple(folds) != ALL_FOLDS:
        names = ", ".join(split_name(f) for f in folds)
        note = f"mean over {names} only; paper mean recomputed over the same splits"
        if paper_row:
            ref = sum(paper_row.split(f) for f in folds) / len(folds)
    return Row(table, method, shots, "mean", fold_avg.mean, fold_avg.seed_std, ref, note, fold_avg.test_std,
               len(fold_avg.per_seed))  # fmt: skip


def table_rows(params: Params, results: dict[tuple[str, int, int], RunResult]) -> dict[str, list[Row]]:
    """The rows of Tables 3, 4 and 5 (``{"table3": [...], ...}``)."""
    variants = params.train.variants
    folds = params.train.folds
    seeds = params.train.seeds
    shots_run = params.evaluate.shots

    def run_or_none(variant: str, shots: int, getter: FoldGetter) -> FoldGetter:
        if variant in variants and shots in shots_run:
            return getter
        return lambda fold: None

    out: dict[str, list[Row]] = {"table3": [], "table4": [], "table5": []}
    for (variant, shots), ref in paper.TABLE3.items():
        getter = run_or_none(variant, shots, shot_getter(results, variant, shots, seeds))
        out["table3"] += method_rows("3", variant, shots, getter, ref, folds)
    for variant, ref in paper.TABLE4.items():
        getter = run_or_none(variant, 1, shot_getter(results, variant, 1, seeds))
        out["table4"] += method_rows("4", variant, 1, getter, ref, folds)
    identical = params.evaluate.identical_input
    getters = {}
    for variant in paper.METHOD_LABELS:
        if variant not in paper.TABLE5 and variant not in variants:
            continue
        getter = _identical_getter(results, variant, seeds) if identical and variant in variants else (lambda f: None)
        getters[variant] = getter
        out["table5"] += method_rows("5", variant, 1, getter, paper.TABLE5.get(variant), folds)
    gain = _gain_getter(getters["simpropnet"], getters["canet"])
    out["table5"] += method_rows("5", "simpropnet-canet", 1, gain, paper.TABLE5_GAIN_OVER_CANET, folds)
    return out


def replicate_value(results: dict[tuple[str, int, int], RunResult]) -> Callable[[str, int, int], Any]:
    """``value(measure)(variant, fold, seed)``: one replicate's 1-/5-shot mIoU (mean over test sets)
    or identical-input mIoU, ``None`` when not run (the input of :mod:`simprop.report.claims`)."""

    def for_measure(measure: str) -> Callable[[str, int, int], float | None]:
        def value(variant: str, fold: int, seed: int) -> float | None:
            res = results.get((variant, fold, seed))
            if res is None:
                return None
            if measure == "identical":
                return (res.evaluate.get("identical") or {}).get("miou")
            return (res.shot(int(measure[4:])) or {}).get("miou_mean")

        return value

    return for_measure


def write_csv(rows: list[Row], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame([r.as_dict() for r in rows], columns=CSV_COLUMNS)
    write_text(path, frame.to_csv(index=False, float_format="%.4f"))


def _fold_mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


SUPPORT_GAIN_BAR = 10.0  # points of 1-shot mIoU the right support must add over a mismatched one
CONTROL_KEYS = ("shot1", "mismatched", "shot5", "identical", "matcher1", "matcher5", "all_foreground", "untrained")


def _with_gains(row: dict) -> dict:
    minus = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
    row["support_gain"] = minus(row["shot1"], row["mismatched"])
    row["shot5_gain"] = minus(row["shot5"], row["shot1"])
    row["identical_gain"] = minus(row["identical"], row["shot1"])
    row["matcher_gain"] = minus(row["shot1"], row["matcher1"])
    return row


def replicate_control_rows(params: Params, results: dict[tuple[str, int, int], RunResult]) -> list[dict]:
    """One row per (variant, training seed, fold) and a mean-over-folds row per (variant, seed),
    from the evaluate records: the support-use controls of each training replicate."""
    rows = []
    for variant in params.train.variants:
        for seed in params.train.seeds:
            per_fold = []
            for fold in params.train.folds:
                res = results.get((variant, fold, seed))
                if res is None:
                    continue
                ev = res.evaluate
                ref = ev.get("reference", {})
                per_fold.append({
                    "variant": variant, "fold": fold, "seed": seed,
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
                rows.append({"variant": variant, "fold": "mean", "seed": seed,
                             **{k: _fold_mean([r[k] for r in per_fold]) for k in CONTROL_KEYS}})  # fmt: skip
    return [_with_gains(r) for r in rows]


def gate_problems(row: dict) -> list[str]:
    """The support-use gates one replicate row fails: support gain >= SUPPORT_GAIN_BAR per fold;
    on the mean-over-folds row 1-shot >= matcher, 5-shot >= 1-shot, identical >= 1-shot; and 1-shot
    above the all-foreground predictor and the untrained network."""
    problems = []
    if row["support_gain"] is not None and row["support_gain"] < SUPPORT_GAIN_BAR:
        problems.append(f"support gain < {SUPPORT_GAIN_BAR:g}")
    if row["fold"] == "mean":
        if row["matcher_gain"] is not None and row["matcher_gain"] < 0:
            problems.append("below the matcher")
        if row["shot5_gain"] is not None and row["shot5_gain"] < 0:
            problems.append("5-shot < 1-shot")
        if row["identical_gain"] is not None and row["identical_gain"] < 0:
            problems.append("identical < 1-shot")
    bars = [v for v in (row["all_foreground"], row["untrained"]) if v is not None]
    if row["shot1"] is not None and bars and row["shot1"] <= max(bars):
        problems.append("not above all-foreground/untrained")
    return problems


def support_use_rows(params: Params, results: dict[tuple[str, int, int], RunResult]) -> list[dict]:
    """One row per (variant, fold) and a mean-over-folds row per variant: the controls averaged
    over the training seeds, with ``failures``, each replicate's failed gates (``"seed 1: ..."``)."""
    replicates = replicate_control_rows(params, results)
    rows = []
    for variant in params.train.variants:
        for fold in [*params.train.folds, "mean"]:
            group = [r for r in replicates if r["variant"] == variant and r["fold"] == fold]
            if not group:
                continue
            row = {"variant": variant, "fold": fold, "seeds": len(group),
                   **{k: _fold_mean([r[k] for r in group]) for k in CONTROL_KEYS}}  # fmt: skip
            row = _with_gains(row)
            row["failures"] = [f"seed {r['seed']}: {p}" for r in group for p in gate_problems(r)]
            rows.append(row)
    return rows
