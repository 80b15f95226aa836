"""The report stage's entry point: the paper's Tables 3, 4 and 5 regenerated from the evaluate
metrics, beside the paper's numbers, with figures and a small summary metric.

Inputs (file contracts in docs/architecture.md), for every ``(variant, fold, training seed)`` in
``params.train.variants`` x ``params.train.folds`` x ``params.train.seeds`` -- the lists from
params, never a glob, so a stale file from a run that has since been dropped from params cannot
leak into a table:

* ``metrics/evaluate/<variant>/fold<i>/seed<s>.json`` (required),
* ``metrics/train/<variant>/fold<i>/seed<s>.json`` (required),
* training curves ``plots/train/{loss,val}/<variant>/fold<i>/seed<s>.csv`` (optional),
* ``outputs/evaluate/<variant>/fold<i>/seed<s>/qualitative.png`` (optional).

Outputs: ``reports/tables.md``, ``reports/table{3,4,5}.csv`` (tidy, one row per method, shots
and split), ``reports/figures/{per_class_iou,training_curves,qualitative}.png`` and the small
DVC metric ``metrics/report.json``.

The parts: :mod:`~simprop.report.results` (loading), :mod:`~simprop.report.tables` (rows, CSVs
and how the numbers are computed), :mod:`~simprop.report.claims` (the paper's claims against the
spread over training seeds), :mod:`~simprop.report.markdown` (``tables.md``),
:mod:`~simprop.report.figures`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simprop.infra.atomic import write_text
from simprop.params import Params
from simprop.report.claims import VERDICT_CODE, Verdict, claims_lists, judge_claims
from simprop.report.figures import plot_per_class_iou, plot_training_curves, qualitative_montage
from simprop.report.markdown import analysis_sections, render_markdown
from simprop.report.results import load_results
from simprop.report.tables import (
    Row,
    method_rows,
    replicate_value,
    shot_getter,
    support_use_rows,
    table_rows,
    write_csv,
)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def report_summary(params: Params, results: dict, tables: dict[str, list[Row]],
                   verdicts: list[Verdict] | None = None) -> dict[str, Any]:  # fmt: skip
    """``metrics/report.json``: per variant run, the mean-over-folds mIoU per shot count (mean over
    the training seeds, ``_std`` its std over them, ``_test_std`` the std over the test sets), the
    identical-input mIoU, the support-use gains and ``gate_failures`` (failed gates of any
    replicate); the verdict on each of the paper's claims (mean difference, 95 % interval,
    ``verdict`` 1 supported / 0 undecided / -1 contradicted) and the three ``claims_lists``."""
    summary: dict[str, Any] = {}
    controls = support_use_rows(params, results)
    for variant in params.train.variants:
        entry: dict[str, float] = {}
        for shots in params.evaluate.shots:
            getter = shot_getter(results, variant, shots, params.train.seeds)
            mean = method_rows("", variant, shots, getter, None, params.train.folds)[-1]
            if mean.ours_mean is not None:
                entry[f"shot{shots}_miou"] = round(mean.ours_mean, 4)
                if mean.ours_std is not None:
                    entry[f"shot{shots}_miou_std"] = round(mean.ours_std, 4)
                if mean.test_std is not None:
                    entry[f"shot{shots}_miou_test_std"] = round(mean.test_std, 4)
        ident = [r for r in tables["table5"] if r.method == variant and r.split == "mean"]
        if ident and ident[0].ours_mean is not None:
            entry["identical_miou"] = round(ident[0].ours_mean, 4)
        mean_row = [r for r in controls if r["variant"] == variant and r["fold"] == "mean"]
        for key in ("support_gain", "shot5_gain", "identical_gain", "matcher_gain", "matcher1", "mismatched"):
            value = mean_row[0][key] if mean_row else None
            if value is not None:
                entry[key] = round(value, 4)
        if mean_row:
            entry["gate_failures"] = sum(len(r["failures"]) for r in controls if r["variant"] == variant)
        if entry:
            summary[variant] = entry
    summary["num_folds"] = len(params.train.folds)
    summary["num_train_seeds"] = len(params.train.seeds)
    if verdicts is not None:
        summary["claims"] = {
            v.claim.key: {"mean": _round(v.mean), "low": _round(v.low), "high": _round(v.high),
                          "paper": _round(v.paper), "verdict": VERDICT_CODE.get(v.verdict)}
            for v in verdicts
        }  # fmt: skip
        summary["claims_lists"] = claims_lists(verdicts)
    return summary


@dataclass
class ReportOutputs:
    """Paths written by :func:`build_report`, and the numbers behind them."""

    tables_md: Path
    csvs: dict[str, Path]
    figures: dict[str, Path]
    summary_json: Path
    summary: dict[str, Any]
    tables: dict[str, list[Row]] = field(repr=False)

    def files(self) -> list[Path]:
        return [self.tables_md, *self.csvs.values(), *self.figures.values(), self.summary_json]


def build_report(params: Params, root: str | Path = ".") -> ReportOutputs:
    """Read the metrics of every (variant, fold) in params and write tables, CSVs, figures and
    ``metrics/report.json`` under ``root``.  Raises :class:`~simprop.report.results.MissingInputError` naming a missing
    metrics file and the stage that writes it."""
    root = Path(root)
    results = load_results(params, root)
    tables = table_rows(params, results)
    verdicts = judge_claims(replicate_value(results), params.train.folds, params.train.seeds)
    reports = root / "reports"
    figures_dir = reports / "figures"
    reports.mkdir(parents=True, exist_ok=True)

    tables_md = reports / "tables.md"
    write_text(tables_md, render_markdown(params, results, tables, analysis_sections(root), root, verdicts))
    csvs = {}
    for name, rows in tables.items():
        csvs[name] = reports / f"{name}.csv"
        write_csv(rows, csvs[name])
    figures = {
        "per_class_iou": plot_per_class_iou(params, results, figures_dir / "per_class_iou.png"),
        "training_curves": plot_training_curves(params, root, figures_dir / "training_curves.png"),
        "qualitative": qualitative_montage(params, root, figures_dir / "qualitative.png"),
    }
    summary = report_summary(params, results, tables, verdicts)
    summary_json = root / "metrics" / "report.json"
    write_text(summary_json, json.dumps(summary, indent=2) + "\n")
    return ReportOutputs(tables_md, csvs, figures, summary_json, summary, tables)
