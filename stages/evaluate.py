"""DVC stage `evaluate`: score each (variant, fold)'s selected checkpoint on the test episodes.

Usage: python stages/evaluate.py [--variant simpropnet] [--fold 0] [--seed 1]
For every variant of train.variants, fold of train.folds, test seed and shot count: mIoU (over
the fold's 5 classes), FB-IoU and per-class IoU, scored as evaluate.resolution / evaluate.void
say; the identical-input test (paper Table 5); and the support-use controls: the prototype
matcher (every test set and shot), the model with a mismatched support (every test set,
1-shot), the all-foreground predictor and the untrained network (first test set), and the gains
read from them (``support_use``).  Each (variant, fold) writes metrics/evaluate/<variant>/fold<i>.json
and outputs/evaluate/<variant>/fold<i>/qualitative.png and logs to its own MLflow run
(simprop.evaluate.run.evaluate_fold).  The folds are the jobs: evaluate.parallel_folds of them run
side by side (simprop/infra/parallel.py), each evaluating the variants in turn and scoring the
parameter-free matcher once. With executor.kind: slurm each (variant, fold, seed) is one SLURM array task
(simprop/infra/slurm.py).  --variant / --fold / --seed evaluate that variant / fold / training seed alone.
"""

from __future__ import annotations

import sys

from simprop.infra.stage import run_stage, stage_args, stage_jobs
from simprop.params import Params


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, jobs=True)

    def body(params: Params) -> int:
        variants, folds, seeds = stage_jobs(params, args.variant, args.fold, args.seed)
        from simprop.infra.executor import run_jobs

        # by name: the workers (or SLURM jobs: executor.kind) import torch and the evaluation code, this process need not
        run_jobs("evaluate", "simprop.evaluate.run:evaluate_fold_variants", params, variants, folds, seeds,
                 params.evaluate.parallel_folds, params.evaluate.device)
        return 0

    scope = "".join(f" {k} {v}" for k, v in (("variant", args.variant), ("fold", args.fold), ("seed", args.seed)) if v is not None)
    return run_stage(f"evaluate{scope}", body, args.params)


if __name__ == "__main__":
    sys.exit(main())
