"""DVC stage `analysis_background`: background similarity (paper §3.1, Figure 3).

Usage: python stages/analysis_background.py
Cosine similarity of foreground and of background MAP vectors of the frozen backbone
(model.backbone_weights) over analysis.background_pairs_per_class same-class image pairs per
class.  Writes metrics/analysis/background_similarity.json and
reports/analysis/background_similarity.{md,csv,png} (+ _pairs.csv); logs to MLflow.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simprop.infra.stage import run_analysis_stage
from simprop.params import Params

STAGE = "analysis_background"


def analyse(params: Params, root: Path) -> int:
    from simprop.infra.timing import span

    with span("imports"):  # what this stage needs, imported once (simprop.infra.timing)
        from simprop.analysis.background_similarity import run_background_similarity, write_background_similarity
        from simprop.infra.tracking import stage_run

    metrics = root / "metrics" / "analysis" / "background_similarity.json"
    reports = root / "reports" / "analysis"
    with stage_run(STAGE, params, repo_root=root) as run:
        result = run_background_similarity(params, root)
        for path in write_background_similarity(result, metrics, reports):
            run.log_artifact(path, "analysis")
        run.log_metrics({k: result[k] for k in ("fg_cosine_mean", "bg_cosine_mean", "pairs", "classes_bg_above_fg")})
        run.log_metrics({f"{r['class']}.{m}": r[m] for r in result["per_class"] for m in ("fg_mean", "bg_mean")})
    print(
        f"{STAGE}: {result['pairs']} pairs, foreground cosine {result['fg_cosine_mean']:.3f}, background "
        f"{result['bg_cosine_mean']:.3f}; background higher for {result['classes_bg_above_fg']}/{result['classes']} classes"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_analysis_stage(STAGE, __doc__, analyse, argv)


if __name__ == "__main__":
    sys.exit(main())
