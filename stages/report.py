"""DVC stage `report`: the paper's Tables 3, 4 and 5 beside our numbers, plus figures.

Usage: python stages/report.py
Reads metrics/evaluate/<variant>/fold<i>/seed<s>.json and metrics/train/<variant>/fold<i>/seed<s>.json
for every variant, fold and training seed in params (train.variants x train.folds x train.seeds),
the training curves under plots/train/ and the qualitative panels under outputs/evaluate/.  Writes
reports/tables.md (with the paper's claims: supported, contradicted, undecided),
reports/table{3,4,5}.csv, reports/figures/{per_class_iou,training_curves,qualitative}.png and
metrics/report.json; logs them to one MLflow run (the claims lists as tags claims.<verdict>).
"""

from __future__ import annotations

import sys
from pathlib import Path

from simprop.infra.stage import run_stage, stage_args
from simprop.params import Params

STAGE = "report"


def report(params: Params, root: Path) -> int:
    from simprop.infra.timing import span

    with span("imports"):  # what this stage needs, imported once (simprop.infra.timing)
        from simprop.infra.tracking import stage_run
        from simprop.report.build import build_report

    with stage_run(STAGE, params, repo_root=root) as run:
        out = build_report(params, root)
        lists = out.summary.get("claims_lists", {})
        run.log_metrics({k: v for k, v in out.summary.items() if k != "claims_lists"})
        run.set_tags({f"claims.{verdict.replace(' ', '_')}": ",".join(keys) or "none" for verdict, keys in lists.items()})
        run.log_artifact(out.tables_md, "reports")
        for path in out.csvs.values():
            run.log_artifact(path, "reports")
        for path in out.figures.values():
            run.log_artifact(path, "reports/figures")
        run.log_artifact(out.summary_json, "metrics")
    for variant in params.train.variants:
        entry = out.summary.get(variant, {})
        shown = ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if not k.endswith("_std") and k != "gate_failures")
        print(f"{STAGE}: {variant}: {shown}")
    for verdict, keys in out.summary.get("claims_lists", {}).items():
        print(f"{STAGE}: claims {verdict}: {', '.join(keys) or 'none'}")
    print(f"{STAGE}: wrote {out.tables_md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, root=True)

    def body(params: Params) -> int:
        from simprop.report.results import StaleInputError

        try:
            return report(params, Path(args.root))
        except StaleInputError as exc:  # the MLflow run is already marked FAILED
            print(f"{STAGE}: error: {exc}", file=sys.stderr)
            return 2

    return run_stage(STAGE, body, args.params)


if __name__ == "__main__":
    sys.exit(main())
