"""DVC stage `analysis_error_similarity`: similarity of mispredicted regions (paper §3.1).

Usage: python stages/analysis_error_similarity.py
(Ze(A).Ze(B)) / (Zg(A).Zg(B)) over analysis.error_pairs same-class test pairs of analysis.fold,
with the errors of models/<analysis.variant>/fold<analysis.fold>/best.pt.  Writes
metrics/analysis/error_similarity.json and reports/analysis/error_similarity{.md,_pairs.csv};
logs to MLflow.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simprop.infra.stage import run_analysis_stage
from simprop.params import Params

STAGE = "analysis_error_similarity"


def analyse(params: Params, root: Path) -> int:
    from simprop.infra.timing import span

    with span("imports"):  # what this stage needs, imported once (simprop.infra.timing)
        from simprop.analysis.error_similarity import run_error_similarity, write_error_similarity
        from simprop.infra.tracking import stage_run

    a = params.analysis
    metrics = root / "metrics" / "analysis" / "error_similarity.json"
    reports = root / "reports" / "analysis"
    with stage_run(STAGE, params, variant=a.variant, fold=a.fold, repo_root=root) as run:
        result = run_error_similarity(params, root)
        for path in write_error_similarity(result, metrics, reports):
            run.log_artifact(path, "analysis")
        run.log_metrics({k: result[k] for k in ("ratio_mean", "ratio_std", "ratio_median", "pairs", "pairs_without_errors")})
    mean = "n/a" if result["ratio_mean"] is None else f"{result['ratio_mean']:.3f} +- {result['ratio_std']:.3f}"
    print(f"{STAGE}: {a.variant} fold {a.fold}: error/ground-truth similarity ratio {mean} "
          f"over {result['pairs']} pairs (paper 0.87 +- 0.25)")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_analysis_stage(STAGE, __doc__, analyse, argv)


if __name__ == "__main__":
    sys.exit(main())
