"""DVC stage `evaluate@<variant>`: score each fold's selected checkpoint on the test episodes.

Usage: python stages/evaluate.py --variant simpropnet [--fold 0]
For each fold, test seed and shot count: mIoU (over the fold's 5 classes), FB-IoU and per-class
IoU, scored as evaluate.resolution / evaluate.void say; the identical-input test (paper Table 5);
and the support-use controls: the prototype matcher (every test set and shot), the model with
a mismatched support (every test set, 1-shot), the all-foreground predictor and the
untrained network (first test set), and the gains read from them (``support_use``).
Each fold writes metrics/evaluate/<variant>/fold<i>.json and
outputs/evaluate/<variant>/fold<i>/qualitative.png and logs to its own MLflow run
(simprop.evaluation.evaluate_fold); evaluate.parallel_folds folds run side by side
(simprop/parallel.py); --fold evaluates that fold alone.
"""

from __future__ import annotations

import sys

from simprop.params import Params
from simprop.stage import run_stage, stage_folds, variant_args


def main(argv: list[str] | None = None) -> int:
    args = variant_args(__doc__, argv)

    def body(params: Params) -> int:
        folds = stage_folds(params, args.variant, args.fold)
        from simprop.parallel import run_folds

        # by name: the workers import torch and the evaluation code, this process need not
        jobs = [(params, args.variant, fold) for fold in folds]
        run_folds("simprop.evaluation:evaluate_fold", jobs, params.evaluate.parallel_folds, [f"{args.variant} fold {f}" for f in folds])
        return 0

    scope = f" fold {args.fold}" if args.fold is not None else ""
    return run_stage(f"evaluate {args.variant}{scope}", body)


if __name__ == "__main__":
    sys.exit(main())
