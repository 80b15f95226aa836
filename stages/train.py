"""DVC stage `train@<variant>-<fold>`: train one variant on one PASCAL-5i fold.

Usage: python stages/train.py --variant simpropnet --fold 0
Outputs models/<variant>/fold<i>/ (persisted: a killed run resumes from its last
completed epoch), metrics/train/<variant>_fold<i>.json and
plots/train/<variant>_fold<i>/; everything is logged to one MLflow run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simprop.params import Params, ParamsError
from simprop.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--fold", type=int, required=True)
    args = parser.parse_args(argv)

    def body(params: Params) -> int:
        if args.variant not in params.train.variants or args.fold not in params.train.folds:
            raise ParamsError(
                f"train.variants/train.folds: ({args.variant}, fold {args.fold}) is not in the params lists"
            )
        from simprop.tracking import stage_run
        from simprop.training import Trainer

        with stage_run("train", params, variant=args.variant, fold=args.fold, shots=1) as run:
            trainer = Trainer(params, args.variant, args.fold, Path("."), tracker=run)
            run.set_tags({"device": str(trainer.device), **trainer.model.parameter_counts()})
            summary = trainer.run()
            run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
            run.log_artifact(trainer.paths.best, "checkpoint")
            run.log_artifact(trainer.paths.metrics)
            run.log_artifact(trainer.paths.loss_curve, "curves")
            run.log_artifact(trainer.paths.val_curve, "curves")
        print(
            f"{args.variant} fold {args.fold}: best validation mIoU {summary['best_val_miou']:.2f} "
            f"at epoch {summary['best_epoch']} ({summary['wall_time_s']} s)"
        )
        return 0

    return run_stage(f"train {args.variant} fold {args.fold}", body)


if __name__ == "__main__":
    sys.exit(main())
