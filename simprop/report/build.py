"""The paper's Tables 3, 4 and 5 regenerated from the evaluate metrics, beside the paper's numbers.

Inputs (file contracts in docs/architecture.md), for every ``(variant, fold)`` in
``params.train.variants`` x ``params.train.folds`` -- the lists from params, never a glob, so a
stale file from a run that has since been dropped from params cannot leak into a table:

* ``metrics/evaluate/<variant>/fold<i>.json`` (required),
* ``metrics/train/<variant>/fold<i>.json`` (required),
* training curves ``plots/train/{loss,val}/<variant>/fold<i>.csv`` (optional),
* ``outputs/evaluate/<variant>/fold<i>/qualitative.png`` (optional).

Outputs: ``reports/tables.md``, ``reports/table{3,4,5}.csv`` (tidy, one row per method, shots
and split), ``reports/figures/{per_class_iou,training_curves,qualitative}.png`` and the small
DVC metric ``metrics/report.json``.

Numbers: a fold's cell is the mean ± sample std (ddof=1) over the test seeds of that fold's
mIoU.  The "mean" column averages the folds *per seed* and then takes mean ± std over seeds,
so its std is the spread of the 4-split mean over test sets.  When not every fold was run,
the mean covers the folds that were, and the paper's mean is recomputed over the same splits
(noted in the table).  The identical-input test (Table 5) has one value per fold (all test
pairs, no seeds), hence no std.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from simprop import paper
from simprop.engine.metrics import mean_std
from simprop.engine.visualize import save_figure
from simprop.infra.atomic import write_text
from simprop.layout import RunLayout
from simprop.params import Params
from simprop.voc import class_id, split_name

DASH = "—"
CSV_COLUMNS = ["table", "method", "shots", "split", "ours_mean", "ours_std", "paper", "diff", "note"]
ALL_FOLDS = (0, 1, 2, 3)


class MissingInputError(FileNotFoundError):
    """A metrics file the report needs does not exist; the message names it and the stage to run."""


class StaleInputError(ValueError):
    """A metrics file was produced under other params (protocol, episodes, seeds, resolution)."""


# --------------------------------------------------------------------------- input paths


def curve_paths(root: Path, variant: str, fold: int) -> tuple[Path | None, Path | None]:
    """(loss, val) curves of a training run (:class:`~simprop.layout.RunLayout`; one folder per
    curve, which DVC plots overlays), each ``None`` when absent."""
    layout = RunLayout(root, variant, fold)
    return tuple(p if p.is_file() else None for p in (layout.loss_curve, layout.val_curve))  # type: ignore[return-value]


# --------------------------------------------------------------------------- loading


@dataclass
class RunResult:
    """What the report knows about one trained and evaluated (variant, fold)."""

    variant: str
    fold: int
    evaluate: dict[str, Any]
    train: dict[str, Any]

    def shot(self, shots: int) -> dict[str, Any] | None:
        return self.evaluate.get(f"shot{shots}")


def _read_json(path: Path, what: str, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInputError(f"{path}: {what} is missing; {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MissingInputError(f"{path}: not valid JSON ({exc}); {hint}") from exc


def load_results(params: Params, root: str | Path = ".") -> dict[tuple[str, int], RunResult]:
    """Read the metrics of every (variant, fold) in the params lists; fail naming a missing file."""
    root = Path(root)
    results = {}
    for variant in params.train.variants:
        for fold in params.train.folds:
            ev_path = RunLayout(root, variant, fold).evaluate_metrics
            ev = _read_json(
                ev_path,
                f"evaluate metrics of {variant} fold {fold}",
                f"run the evaluate stage: `dvc repro evaluate` "
                f"(or `python stages/evaluate.py --variant {variant} --fold {fold}`)",
            )
            _check_fresh(ev, ev_path, params, variant, fold)
            tr = _read_json(
                RunLayout(root, variant, fold).train_metrics,
                f"training metrics of {variant} fold {fold}",
                f"run the train stage: `dvc repro train` "
                f"(or `python stages/train.py --variant {variant} --fold {fold}`)",
            )
            results[(variant, fold)] = RunResult(variant, fold, ev, tr)
    return results


def _check_fresh(record: dict, path: Path, params: Params, variant: str, fold: int) -> None:
    expected = {
        "variant": variant,
        "fold": fold,
        "protocol": params.splits.protocol,
        "episodes": params.episodes.num_episodes,
        "seeds": list(params.episodes.test_seeds),
        "resolution": params.evaluate.resolution,
        "void": params.evaluate.void,
        "class_sampling": params.episodes.class_sampling,
    }
    for key, want in expected.items():
        if key in record and record[key] != want:
            raise StaleInputError(
                f"{path}: {key} is {record[key]!r} but params say {want!r}; the file is stale, "
                f"rerun `dvc repro evaluate`"
            )


# --------------------------------------------------------------------------- table rows


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


def _shot_getter(results: dict, variant: str, shots: int) -> FoldGetter:
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


def _rows(
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
        getter = run_or_none(variant, shots, _shot_getter(results, variant, shots))
        out["table3"] += _rows("3", variant, shots, getter, ref, folds)
    for variant, ref in paper.TABLE4.items():
        getter = run_or_none(variant, 1, _shot_getter(results, variant, 1))
        out["table4"] += _rows("4", variant, 1, getter, ref, folds)
    identical = params.evaluate.identical_input
    getters = {}
    for variant in paper.METHOD_LABELS:
        if variant not in paper.TABLE5 and variant not in variants:
            continue
        getter = _identical_getter(results, variant) if identical and variant in variants else (lambda f: None)
        getters[variant] = getter
        out["table5"] += _rows("5", variant, 1, getter, paper.TABLE5.get(variant), folds)
    gain = _gain_getter(getters["simpropnet"], getters["canet"])
    out["table5"] += _rows("5", "simpropnet-canet", 1, gain, paper.TABLE5_GAIN_OVER_CANET, folds)
    return out


# --------------------------------------------------------------------------- markdown


def _fmt(value: float | None, std: float | None = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    value = round(value, 2) + 0.0  # no "-0.00" from float noise
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std:.2f}"
    return text


def _method_name(method: str) -> str:
    if method == "simpropnet-canet":
        return "SimPropNet − CANet"
    return paper.method_label(method)


def markdown_table(rows: list[Row], show_shots: bool = True) -> str:
    """Rows grouped per (method, shots): an "ours", a "paper" and a "Δ" line each."""
    head = ["method"] + (["shots"] if show_shots else []) + [""] + [split_name(f) for f in ALL_FOLDS] + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    notes = []
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, row.shots), []).append(row)
    for (method, shots), group in groups.items():
        lead = [_method_name(method)] + ([str(shots)] if show_shots else [])
        blank = [""] * len(lead)
        ours = [_fmt(r.ours_mean, r.ours_std) for r in group]
        mean_row = group[-1]
        if mean_row.note:
            notes.append(f"{_method_name(method)}, {shots}-shot: {mean_row.note}.")
            ours[-1] += " *"
        lines.append("| " + " | ".join(lead + ["ours"] + ours) + " |")
        lines.append("| " + " | ".join(blank + ["paper"] + [_fmt(r.paper) for r in group]) + " |")
        lines.append("| " + " | ".join(blank + ["Δ"] + [_fmt(r.diff, signed=True) for r in group]) + " |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"\\* {n}" for n in notes) + "\n"
    return text


CLASS_SAMPLING_TEXT = {
    "pairs": "query = a uniformly drawn (image, class) test pair, then distinct supports of its class "
    "(the OSLSM / CANet / HSNet / PFENet convention: classes in proportion to their pairs)",
    "uniform": "a class uniformly among the fold's 5, then query and supports among its images "
    "(not the references' convention: FB-IoU and the spread differ)",
}
SCORING_TEXT = {
    "original": "`original` label size (each query's own; HSNet / PFENet convention)",
    "321": "`321`: labels resized (nearest) to 321x321, as CANet's code scores",
}
VOID_TEXT = {
    "ignore": "void (255) `ignore`d (in neither intersection nor union)",
    "background": "void (255) counted as `background` (OSLSM's test code)",
}


def _published_cell(root: Path | None) -> str:
    """Whether the fold lists are the published OSLSM-protocol lists (from ``metrics/splits.json``)."""
    path = None if root is None else Path(root) / "metrics" / "splits.json"
    if path is None or not path.is_file():
        return f"{DASH} (`metrics/splits.json` not found)"
    try:
        published = json.loads(path.read_text()).get("published_lists")
    except json.JSONDecodeError:
        return f"{DASH} (`{path}` is not valid JSON)"
    if not published:
        return f"{DASH} (not recorded; rerun the splits stage)"
    if not published.get("checked"):
        return published.get("note") or "not checked"
    cells = []
    for key, value in published.items():
        if key.startswith("fold") and isinstance(value, dict):
            marks = (f"{key} {name} {'✓' if v['matches_published'] else '✗'}" for name, v in value.items())
            cells.append(", ".join(marks))
    verdict = "**all match**" if published.get("matches_all") else "**MISMATCH: not the published lists**"
    return f"{verdict} ({published.get('source')}; count + md5): " + "; ".join(cells)


def _header(params: Params, root: Path | None = None) -> str:
    ep = params.episodes
    seeds = ", ".join(str(s) for s in ep.test_seeds)
    lines = [
        "# SimPropNet reproduction: paper tables",
        "",
        "Regenerated by the `report` stage from `metrics/evaluate/*.json` (variants and folds "
        "from params, never a glob). mIoU in %, PASCAL-5i, folds 0..3 = split-1..split-4.",
        "",
        "| | |",
        "|---|---|",
        f"| protocol | `{params.splits.protocol}` (small-object filter `{params.splits.small_object_filter}`) |",
        f"| setup | `{params.setup}` |",
        f"| data source | `{params.data.source}` |",
        f"| test episodes | {ep.num_episodes} per fold and test set |",
        f"| test seeds | {seeds} ({len(ep.test_seeds)} test sets; ± is the sample std, ddof=1, over them) |",
        f"| episode sampling | `{ep.class_sampling}`: {CLASS_SAMPLING_TEXT[ep.class_sampling]} |",
        f"| scoring (our columns) | {SCORING_TEXT[params.evaluate.resolution]} (network input "
        f"{params.evaluate.image_size}x{params.evaluate.image_size}), {VOID_TEXT[params.evaluate.void]}; "
        "mIoU = mean over the fold's 5 classes, a class without a defined IoU counts as 0 "
        "(`classes_scored` in the metrics) |",
        "| scoring (paper columns) | the paper's baseline numbers come from CANet's code (\"author-provided "
        "code\", §4), which scores labels resized to 321x321 (the paper does not state the convention of "
        "its own numbers). `dvc exp run -S setup=paper -S evaluate.resolution=321` evaluates in that "
        "convention |",
        f"| published lists | {_published_cell(root)} |",
        f"| checkpoint | best validation-episode mIoU ({ep.num_val_episodes} episodes, seed {ep.val_seed}) |",
        f"| training | {params.train.epochs} epochs, batch {params.train.batch_size}, lr {params.train.lr} "
        f"({params.train.lr_schedule}; encoder projection x {params.train.projection_lr_scale}, "
        f"{params.train.projection_init} init), "
        f"backbone `{params.model.backbone_weights}` |",
        f"| CANet's IOM | variants {', '.join(params.model.iom_variants) or 'none'}: history fed with "
        f"p = {params.train.iom_history_p} in training, {params.model.iom_iterations} refinement passes at test time |",
        f"| variants / folds | {', '.join(params.train.variants)} / "
        f"{', '.join(str(f) for f in params.train.folds)} |",
        "",
        "Cells: **ours** = mean ± std over the test sets, **paper** = the paper's number, "
        f"**Δ** = ours − paper; {DASH} = not run.",
    ]
    if params.data.source != "voc":
        lines += [
            "",
            f"> **Note:** data source `{params.data.source}` is not PASCAL VOC: these numbers exercise "
            "the pipeline and are not comparable with the paper's.",
        ]
    return "\n".join(lines) + "\n"


def _fold_mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def _support_use_rows(params: Params, results: dict[tuple[str, int], RunResult]) -> list[dict]:
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


SUPPORT_GAIN_BAR = 10.0  # points of 1-shot mIoU the right support must add over a mismatched one


def _support_use_checks(row: dict) -> str:
    """What the controls say about one row (see the section text)."""
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
    if row["shot1"] is None:
        return DASH
    return "ok" if not problems else "**" + "; ".join(problems) + "**"


def _support_use_table(params: Params, results: dict[tuple[str, int], RunResult]) -> str:
    lines = [
        "| variant | fold | 1-shot | mismatched support | support gain | 5-shot gain | identical gain | "
        "matcher 1-shot | matcher 5-shot | vs matcher | all-fg | untrained | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _support_use_rows(params, results):
        fold = "**mean**" if r["fold"] == "mean" else str(r["fold"])
        lines.append(
            f"| {r['variant']} | {fold} | {_fmt(r['shot1'])} | {_fmt(r['mismatched'])} | "
            f"{_fmt(r['support_gain'], signed=True)} | {_fmt(r['shot5_gain'], signed=True)} | "
            f"{_fmt(r['identical_gain'], signed=True)} | {_fmt(r['matcher1'])} | {_fmt(r['matcher5'])} | "
            f"{_fmt(r['matcher_gain'], signed=True)} | {_fmt(r['all_foreground'])} | {_fmt(r['untrained'])} | "
            f"{_support_use_checks(r)} |"
        )
    return "\n".join(lines) + "\n"


def _ordering_statement(tables: dict[str, list[Row]]) -> str:
    """Table 4's component ordering (mean over folds), ours beside the paper's, said plainly."""
    means = {r.method: r for r in tables["table4"] if r.split == "mean"}
    ours = {m: r.ours_mean for m, r in means.items() if r.ours_mean is not None}
    if len(ours) < 2:
        return "Fewer than two variants were run: no component ordering to compare.\n"
    theirs = {m: r.paper for m, r in means.items() if m in ours and r.paper is not None}
    order = lambda values: " > ".join(_method_name(m) for m, _ in sorted(values.items(), key=lambda kv: -kv[1]))  # noqa: E731
    ours_order, paper_order = order(ours), order(theirs)
    same = [m for m, _ in sorted(ours.items(), key=lambda kv: -kv[1])] == [m for m, _ in sorted(theirs.items(), key=lambda kv: -kv[1])]
    verdict = "the same as" if same else "**not** the same as"
    return (
        f"Component ordering by mean 1-shot mIoU (Table 4), ours: {ours_order}.  Paper: {paper_order}.  "
        f"Ours is {verdict} the paper's.  Hyperparameters were chosen on validation episodes only, "
        "never toward the paper's ordering.\n"
    )


def _training_table(results: dict[tuple[str, int], RunResult]) -> str:
    lines = [
        "| variant | fold | best val mIoU | best epoch | epochs | first loss | final loss | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (variant, fold), res in results.items():
        t = res.train

        def num(key: str, digits: int = 2) -> str:
            v = t.get(key)
            return DASH if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

        lines.append(
            f"| {variant} | {fold} | {num('best_val_miou')} | {num('best_epoch')} | {num('epochs')} | "
            f"{num('first_loss', 4)} | {num('final_loss', 4)} | {num('wall_time_s', 1)} |"
        )
    return "\n".join(lines) + "\n"


ANALYSES = (
    ("background_similarity", "Background vs foreground similarity (paper Figure 3)"),
    ("error_similarity", "Similarity of mispredicted regions (paper §3.1)"),
    ("error_overlap", "Error overlap with a supervised model (paper Table 1)"),
)


def analysis_sections(root: Path) -> str:
    """The analysis stages' markdown (``reports/analysis/<name>.md``), one section each."""
    parts = ["## Analyses (paper §3.1 and §5.2)\n"]
    for name, title in ANALYSES:
        path = root / "reports" / "analysis" / f"{name}.md"
        if path.is_file():
            body = path.read_text().strip()
            if not body.startswith("# "):  # the analysis' own title (demoted below) heads its section
                parts.append(f"### {title}\n")
            parts.append("\n".join("##" + line if line.startswith("#") else line for line in body.splitlines()))
        else:
            parts.append(f"### {title}\n")
            parts.append(f"_not run: `{path}` is missing (dvc repro analysis_{name})_")
        parts.append("")
    return "\n".join(parts)


def render_markdown(
    params: Params, results: dict, tables: dict[str, list[Row]], analyses: str = "", root: Path | None = None
) -> str:
    parts = [
        _header(params, root),
        "## Table 3: one-shot and five-shot mIoU\n",
        markdown_table(tables["table3"]),
        "## Table 4: ablation of the components (1-shot)\n",
        markdown_table(tables["table4"], show_shots=False),
        "## Table 5: identical input (support = query, 1-shot)\n",
        "All test pairs of the fold once each, so one value per fold (no seeds, no std).\n",
        markdown_table(tables["table5"], show_shots=False),
        _ordering_statement(tables),
        "## Does the model use its support?\n",
        "A few-shot model must score clearly better with the right support than with a support of "
        "another class (**mismatched support**: the episode files' supports of another class of the "
        "fold, the same for every variant), better with five supports than one and better still with "
        "the query as its own support; and it must beat the **prototype matcher**, the "
        "parameter-free predictor on the same frozen features (per pixel, cosine to the support's "
        "foreground prototype vs its background prototype). 1-shot, mismatched and matcher: mean "
        "over the test sets; all-foreground and untrained network: first test set. Gains in "
        f"points; check: support gain >= {SUPPORT_GAIN_BAR:g} per fold, and on the mean rows 1-shot "
        ">= matcher, 5-shot >= 1-shot, identical >= 1-shot.\n",
        _support_use_table(params, results),
        "## Training\n",
        _training_table(results),
        "## Figures\n",
        "- `figures/per_class_iou.png`: per-class IoU per variant (1-shot, mean over test sets)",
        "- `figures/training_curves.png`: training loss per step and validation mIoU per epoch",
        "- `figures/qualitative.png`: support / query / prediction / ground truth examples",
        "",
        analyses,
    ]
    return "\n".join(parts)


def write_csv(rows: list[Row], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame([r.as_dict() for r in rows], columns=CSV_COLUMNS)
    write_text(path, frame.to_csv(index=False, float_format="%.4f"))


# --------------------------------------------------------------------------- figures


def class_iou_by_variant(params: Params, results: dict, shots: int = 1) -> dict[str, dict[str, float]]:
    """``{variant: {class name: IoU %}}``, mean over test sets, classes from each run's fold."""
    out: dict[str, dict[str, float]] = {}
    for (variant, _fold), res in results.items():
        entry = res.shot(shots)
        if not entry:
            continue
        means = entry.get("class_iou_mean")
        if means is None:
            seeds = [v["class_iou"] for k, v in entry.items() if k.startswith("seed") and isinstance(v, dict)]
            names = {n for s in seeds for n in s}
            means = {n: mean_std([s.get(n) for s in seeds])[0] for n in names}
        for name, value in means.items():
            if value is not None and not math.isnan(value):
                out.setdefault(variant, {})[name] = value
    return out


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global figure or backend state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_per_class_iou(params: Params, results: dict, path: Path) -> Path:
    shots = 1 if 1 in params.evaluate.shots else min(params.evaluate.shots)
    data = class_iou_by_variant(params, results, shots)
    names = sorted({n for d in data.values() for n in d}, key=class_id)
    fig = _new_figure(max(8.0, 0.55 * len(names) + 2), 4.5)
    ax = fig.add_subplot()
    if not names:
        ax.text(0.5, 0.5, "no per-class IoU in the metrics files", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = 0.8 / max(1, len(data))
        for i, (variant, values) in enumerate(data.items()):
            xs = [j + (i - (len(data) - 1) / 2) * width for j, n in enumerate(names) if n in values]
            ys = [values[n] for n in names if n in values]
            ax.bar(xs, ys, width=width, label=paper.method_label(variant))
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel("IoU (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Per-class IoU, {shots}-shot, mean over test sets ({params.splits.protocol}, {params.data.source})")
        ax.legend(fontsize="small", ncols=min(5, len(data)))
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, dpi=fig.dpi)


def _read_curve(path: Path | None, x: str, y: str):
    if path is None:
        return None
    import pandas as pd

    frame = pd.read_csv(path)
    if x not in frame or y not in frame or frame.empty:
        return None
    return frame[x].to_numpy(), frame[y].to_numpy(dtype=float)


def plot_training_curves(params: Params, root: Path, path: Path) -> Path:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    folds = list(params.train.folds)
    fig = _new_figure(11, 2.8 * len(folds) + 0.5)
    axes = fig.subplots(len(folds), 2, squeeze=False)
    colours = {v: f"C{i}" for i, v in enumerate(params.train.variants)}
    any_curve = False
    for row, fold in enumerate(folds):
        ax_loss, ax_val = axes[row]
        for variant in params.train.variants:
            loss_path, val_path = curve_paths(root, variant, fold)
            loss = _read_curve(loss_path, "step", "loss")
            if loss is not None:
                steps, values = loss
                window = max(1, len(values) // 50)
                if window > 1:  # moving average: per-step loss is noisy
                    values = np.convolve(values, np.ones(window) / window, mode="valid")
                    steps = steps[window - 1 :]
                ax_loss.plot(steps, values, color=colours[variant], label=paper.method_label(variant), lw=1)
                any_curve = True
            val = _read_curve(val_path, "epoch", "val_miou")
            if val is not None:
                ax_val.plot(*val, marker="o", ms=3, color=colours[variant], label=paper.method_label(variant))
                any_curve = True
        ax_loss.set_title(f"{split_name(fold)}: training loss")
        ax_loss.set_xlabel("step")
        ax_val.set_title(f"{split_name(fold)}: validation mIoU")
        ax_val.set_xlabel("epoch")
        ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_val.set_ylabel("mIoU (%)")
        for ax in (ax_loss, ax_val):
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize="x-small")
    if not any_curve:
        fig.suptitle("no training curves found under plots/train/")
    return save_figure(fig, path, dpi=fig.dpi)


def qualitative_montage(params: Params, root: Path, path: Path, max_width: int = 1200) -> Path:
    """One qualitative panel per variant, all from the same fold (the same episodes), stacked."""
    from PIL import Image, ImageDraw

    panels = []
    for variant in params.train.variants:
        for fold in params.train.folds:
            src = RunLayout(root, variant, fold).qualitative
            if src.is_file():
                panels.append((f"{paper.method_label(variant)}, {split_name(fold)}", src))
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    if not panels:
        img = Image.new("RGB", (640, 80), "white")
        ImageDraw.Draw(img).text((10, 30), "no qualitative panels in outputs/evaluate/", fill="black")
        img.save(path)
        return path
    images = []
    for caption, src in panels:
        with Image.open(src) as im:
            im = im.convert("RGB")
            if im.width > max_width:
                im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
            images.append((caption, im.copy()))
    caption_h = 24
    width = max(im.width for _, im in images)
    height = sum(im.height + caption_h for _, im in images)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for caption, im in images:
        draw.text((8, y + 6), caption, fill="black")
        canvas.paste(im, (0, y + caption_h))
        y += im.height + caption_h
    canvas.save(path)
    return path


# --------------------------------------------------------------------------- summary metric


def report_summary(params: Params, results: dict, tables: dict[str, list[Row]]) -> dict[str, Any]:
    """``metrics/report.json``: per variant run, the mean-over-folds mIoU (and its std over test
    sets) per shot count and the identical-input mIoU."""
    summary: dict[str, Any] = {}
    for variant in params.train.variants:
        entry: dict[str, float] = {}
        for shots in params.evaluate.shots:
            getter = _shot_getter(results, variant, shots)
            mean = _rows("", variant, shots, getter, None, params.train.folds)[-1]
            if mean.ours_mean is not None:
                entry[f"shot{shots}_miou"] = round(mean.ours_mean, 4)
                if mean.ours_std is not None:
                    entry[f"shot{shots}_miou_std"] = round(mean.ours_std, 4)
        ident = [r for r in tables["table5"] if r.method == variant and r.split == "mean"]
        if ident and ident[0].ours_mean is not None:
            entry["identical_miou"] = round(ident[0].ours_mean, 4)
        mean_row = [r for r in _support_use_rows(params, results) if r["variant"] == variant and r["fold"] == "mean"]
        for key in ("support_gain", "shot5_gain", "identical_gain", "matcher_gain", "matcher1", "mismatched"):
            value = mean_row[0][key] if mean_row else None
            if value is not None:
                entry[key] = round(value, 4)
        if entry:
            summary[variant] = entry
    summary["num_folds"] = len(params.train.folds)
    return summary


# --------------------------------------------------------------------------- entry point


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
    ``metrics/report.json`` under ``root``.  Raises :class:`MissingInputError` naming a missing
    metrics file and the stage that writes it."""
    root = Path(root)
    results = load_results(params, root)
    tables = table_rows(params, results)
    reports = root / "reports"
    figures_dir = reports / "figures"
    reports.mkdir(parents=True, exist_ok=True)

    tables_md = reports / "tables.md"
    write_text(tables_md, render_markdown(params, results, tables, analysis_sections(root), root))
    csvs = {}
    for name, rows in tables.items():
        csvs[name] = reports / f"{name}.csv"
        write_csv(rows, csvs[name])
    figures = {
        "per_class_iou": plot_per_class_iou(params, results, figures_dir / "per_class_iou.png"),
        "training_curves": plot_training_curves(params, root, figures_dir / "training_curves.png"),
        "qualitative": qualitative_montage(params, root, figures_dir / "qualitative.png"),
    }
    summary = report_summary(params, results, tables)
    summary_json = root / "metrics" / "report.json"
    write_text(summary_json, json.dumps(summary, indent=2) + "\n")
    return ReportOutputs(tables_md, csvs, figures, summary_json, summary, tables)
