"""DVC stage `splits`: PASCAL-5i (image, class) pair lists per fold and their counts (a metric)."""

from __future__ import annotations

import sys

from simprop.data.layout import DataLayout
from simprop.data.splits import build_splits, comparison_table, published_tag, published_warning
from simprop.infra.stage import run_stage, stage_parser
from simprop.infra.tracking import stage_run
from simprop.params import Params


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--metrics", default="metrics/splits.json", help="where the per-fold counts go")
    args = parser.parse_args(argv)

    def body(params: Params) -> int:
        layout = DataLayout(params.data.root)
        with stage_run("splits", params) as run:
            metrics = build_splits(
                layout, params.splits, args.metrics, workers=params.data.workers, data_source=params.data.source
            )
            published = metrics["published_lists"]
            run.set_tags({"published_lists": published_tag(metrics, params.splits.folds)})
            if published["checked"]:
                run.log_metrics({
                    f"fold{fold}.matches_published.{name}": int(metrics[f"fold{fold}"]["matches_published"][name])
                    for fold in params.splits.folds for name in ("trn", "val")
                })  # fmt: skip
            run.log_artifact(args.metrics)
        s = params.splits
        print(f"splits: protocol {s.protocol}, small-object filter {s.small_object_filter}, folds {list(s.folds)}")
        print(comparison_table(metrics, s.folds))
        if not published["checked"]:
            print(f"splits: published lists {published['note']}")
        warning = published_warning({f: published[f"fold{f}"] for f in s.folds}) if published["checked"] else None
        if warning:
            print(warning, file=sys.stderr)
        elif published["checked"]:
            print(f"splits: every list matches the published one ({published['source']})")
        return 0

    return run_stage("splits", body, args.params)


if __name__ == "__main__":
    sys.exit(main())
