"""DVC stage `analysis_error_overlap`: errors of the few-shot vs a supervised model (Table 1).

Usage: python stages/analysis_error_overlap.py
FN overlap, FP overlap and TP gap between models/<analysis.variant>/fold<analysis.fold>/best.pt
and torchvision's DeepLabV3-ResNet50 (analysis.supervised_weights) on the fold's 1-shot test
episodes.  Writes metrics/analysis/error_overlap.json and reports/analysis/error_overlap.{md,csv};
logs to MLflow.  When the supervised weights cannot be loaded (no internet, 'none') the stage
is skipped: it prints why, writes {"skipped": true, "reason": ...} and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simprop.infra.stage import run_analysis_stage
from simprop.params import Params

STAGE = "analysis_error_overlap"


def analyse(params: Params, root: Path) -> int:
    from simprop.infra.timing import span

    with span("imports"):  # what this stage needs, imported once (simprop.infra.timing)
        from simprop.analysis.error_overlap import run_error_overlap, write_error_overlap
        from simprop.infra.tracking import stage_run

    a = params.analysis
    metrics = root / "metrics" / "analysis" / "error_overlap.json"
    reports = root / "reports" / "analysis"
    with stage_run(STAGE, params, variant=a.variant, fold=a.fold, repo_root=root) as run:
        result = run_error_overlap(params, root)
        for path in write_error_overlap(result, metrics, reports):
            run.log_artifact(path, "analysis")
        if result["skipped"]:
            run.set_tags({"skipped": "true", "skip_reason": result["reason"]})
        else:
            run.log_metrics({k: result[k] for k in ("fn_overlap", "fp_overlap", "tp_gap", "fss_miou", "supervised_miou")})
    if result["skipped"]:
        print(f"{STAGE}: skipped (not an error): {result['reason']}")
        return 0

    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    print(f"{STAGE}: {a.variant} fold {a.fold}: FN overlap {fmt(result['fn_overlap'])}, FP overlap "
          f"{fmt(result['fp_overlap'])}, TP gap {fmt(result['tp_gap'])} (paper CANet: 18.32 / 9.11 / 23.28)")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_analysis_stage(STAGE, __doc__, analyse, argv)


if __name__ == "__main__":
    sys.exit(main())
