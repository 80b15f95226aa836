"""``reports/tables.md``: the header (the run's protocol and scoring conventions), Tables 3, 4 and 5
beside the paper's numbers, the support-use controls, the training runs and the analyses' sections.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from simprop import paper
from simprop.params import Params
from simprop.report.claims import CONTRADICTED, NOT_RUN, SUPPORTED, UNDECIDED, Verdict
from simprop.report.results import RunResult
from simprop.report.tables import ALL_FOLDS, SUPPORT_GAIN_BAR, Row, support_use_rows
from simprop.voc import split_name

DASH = "—"


def _fmt(value: float | None, std: float | None = None, signed: bool = False, test_std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    value = round(value, 2) + 0.0  # no "-0.00" from float noise
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std:.2f}"
    if test_std is not None and not math.isnan(test_std):
        text += f" ({test_std:.2f})"
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
        ours = [_fmt(r.ours_mean, r.ours_std, test_std=r.test_std) for r in group]
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
    train_seeds = ", ".join(str(s) for s in params.train.seeds)
    n_train = len(params.train.seeds)
    replicates = (
        f"{train_seeds} ({n_train} trainings per variant and fold; ± is the sample std, ddof=1, over them)"
        if n_train > 1 else f"{train_seeds} (**one draw per cell: differences not tested**; `train.seeds` trains replicates)"
    )
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
        f"| training seeds | {replicates} |",
        f"| test seeds | {seeds} ({len(ep.test_seeds)} test sets; (·) is the sample std over them, averaged over the training seeds) |",
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
        "Cells: **ours** = mean over the training seeds ± their std (the spread of one training), "
        "then in brackets the std over the test sets (the test episodes' sampling noise); "
        f"**paper** = the paper's number, **Δ** = ours − paper; {DASH} = not run. Whether a difference "
        "between two variants is real is tested in \"The paper's claims\" below.",
    ]
    if params.data.source != "voc":
        lines += [
            "",
            f"> **Note:** data source `{params.data.source}` is not PASCAL VOC: these numbers exercise "
            "the pipeline and are not comparable with the paper's.",
        ]
    return "\n".join(lines) + "\n"


def _support_use_checks(row: dict) -> str:
    """Every training replicate's failed gates (``row["failures"]``), or ok."""
    if row["shot1"] is None:
        return DASH
    return "ok" if not row["failures"] else "**" + "; ".join(row["failures"]) + "**"


def _support_use_table(params: Params, results: dict[tuple[str, int], RunResult]) -> str:
    lines = [
        "| variant | fold | 1-shot | mismatched support | support gain | 5-shot gain | identical gain | "
        "matcher 1-shot | matcher 5-shot | vs matcher | all-fg | untrained | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in support_use_rows(params, results):
        fold = "**mean**" if r["fold"] == "mean" else str(r["fold"])
        lines.append(
            f"| {r['variant']} | {fold} | {_fmt(r['shot1'])} | {_fmt(r['mismatched'])} | "
            f"{_fmt(r['support_gain'], signed=True)} | {_fmt(r['shot5_gain'], signed=True)} | "
            f"{_fmt(r['identical_gain'], signed=True)} | {_fmt(r['matcher1'])} | {_fmt(r['matcher5'])} | "
            f"{_fmt(r['matcher_gain'], signed=True)} | {_fmt(r['all_foreground'])} | {_fmt(r['untrained'])} | "
            f"{_support_use_checks(r)} |"
        )
    return "\n".join(lines) + "\n"


CLAIM_HEADINGS = (
    (SUPPORTED, "Supported", "the 95 % interval of the difference lies above 0"),
    (CONTRADICTED, "Contradicted", "the interval lies below 0"),
    (UNDECIDED, "Undecided", "the interval contains 0, or one draw per cell"),
    (NOT_RUN, "Not run", "a variant or shot count of the claim is not in params"),
)


def claims_section(params: Params, verdicts: list[Verdict]) -> str:
    """The paper's claims as mean paired differences over (fold, training seed) with 95 % t
    intervals, then in three lists: supported, contradicted, undecided."""
    n_seeds, n_folds = len(params.train.seeds), len(params.train.folds)
    lines = [
        "## The paper's claims\n",
        "Each claim \"A beats B\" is read from the paired differences A − B of every fold and training "
        f"seed ({n_folds} folds x {n_seeds} seeds; each value the mean over the test sets): their mean over "
        "the folds, and a 95 % t interval over training seeds (seed variance pooled within folds, "
        "fold x (seeds − 1) degrees of freedom; `simprop/report/claims.py` says why). The test episodes are "
        "shared by both variants, so the interval is conditional on them. **Supported**: the interval lies "
        "above 0; **contradicted**: below 0; **undecided**: it contains 0.\n",
        "| claim | source | ours: mean difference [95 % interval] | paper | verdict |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        interval = f" [{_fmt(v.low, signed=True)}, {_fmt(v.high, signed=True)}]" if v.low is not None else ""
        ours = (_fmt(v.mean, signed=True) + interval) if v.mean is not None else DASH
        verdict = f"**{v.verdict}**" + (f" ({v.note})" if v.note else "")
        lines.append(f"| {v.claim.text} | {v.claim.source} | {ours} | {_fmt(v.paper, signed=True)} | {verdict} |")
    lines.append("")
    for key, title, meaning in CLAIM_HEADINGS:
        chosen = [v for v in verdicts if v.verdict == key]
        if key == NOT_RUN and not chosen:
            continue
        lines.append(f"**{title}** ({meaning}):\n")
        lines += [f"- {v.claim.text} ({v.claim.source})" for v in chosen] or ["- none"]
        lines.append("")
    lines.append("Hyperparameters were chosen on validation episodes only, never toward the paper's ordering.\n")
    return "\n".join(lines)


def _training_table(results: dict[tuple[str, int, int], RunResult]) -> str:
    lines = [
        "| variant | fold | seed | best val mIoU | best epoch | epochs | first loss | final loss | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, fold, seed), res in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        t = res.train

        def num(key: str, digits: int = 2) -> str:
            v = t.get(key)
            return DASH if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

        lines.append(
            f"| {variant} | {fold} | {seed} | {num('best_val_miou')} | {num('best_epoch')} | {num('epochs')} | "
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
    params: Params, results: dict, tables: dict[str, list[Row]], analyses: str = "", root: Path | None = None,
    verdicts: list[Verdict] | None = None,
) -> str:
    parts = [
        _header(params, root),
        "## Table 3: one-shot and five-shot mIoU\n",
        markdown_table(tables["table3"]),
        "## Table 4: ablation of the components (1-shot)\n",
        markdown_table(tables["table4"], show_shots=False),
        "## Table 5: identical input (support = query, 1-shot)\n",
        "All test pairs of the fold once each, so one value per fold and training seed (no test sets).\n",
        markdown_table(tables["table5"], show_shots=False),
        claims_section(params, verdicts or []),
        "## Does the model use its support?\n",
        "A few-shot model must score clearly better with the right support than with a support of "
        "another class (**mismatched support**: the episode files' supports of another class of the "
        "fold, the same for every variant), better with five supports than one and better still with "
        "the query as its own support; and it must beat the **prototype matcher**, the "
        "parameter-free predictor on the same frozen features (per pixel, cosine to the support's "
        "foreground prototype vs its background prototype). 1-shot, mismatched and matcher: mean "
        "over the test sets; all-foreground and untrained network: first test set; every value averaged "
        "over the training seeds. Gains in points; check, for **every training seed**: support gain >= "
        f"{SUPPORT_GAIN_BAR:g} per fold, and on the mean rows 1-shot >= matcher, 5-shot >= 1-shot, "
        "identical >= 1-shot (a failing replicate is named by its seed).\n",
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
