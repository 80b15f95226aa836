"""DVC stage `train@<variant>`: train one variant on every PASCAL-5i fold of train.folds.

Usage: python stages/train.py --variant simpropnet [--fold 0]
Each fold writes models/<variant>/fold<i>/ (persisted: a killed run resumes from its last
completed epoch), metrics/train/<variant>/fold<i>.json and plots/train/{loss,val}/<variant>/fold<i>.csv,
and logs to its own MLflow run (simprop.training.train_fold). train.parallel_folds folds train
side by side, each in its own process (simprop/parallel.py); --fold trains that fold alone.
With train.processes = N > 1 each fold is trained in turn by N DDP processes: the script
relaunches itself under torchrun (one process per GPU); it can also be started by hand with
``torchrun --nproc_per_node N stages/train.py --variant ... --fold ...``.
"""

from __future__ import annotations

import subprocess
import sys

from simprop.params import Params
from simprop.stage import run_stage, stage_folds, under_torchrun, variant_args


def main(argv: list[str] | None = None) -> int:
    args = variant_args(__doc__, argv)

    def body(params: Params) -> int:
        folds = stage_folds(params, args.variant, args.fold)
        from simprop.parallel import run_folds

        if params.train.processes > 1 and not under_torchrun():
            # train.processes > 1: relaunch this script under torchrun per fold, one process per GPU.
            from simprop.distributed import torchrun_command

            for fold in folds:
                command = torchrun_command(params.train.processes, __file__, ["--variant", args.variant, "--fold", str(fold)])
                print("launching", " ".join(command), flush=True)
                code = subprocess.call(command)
                if code:
                    return code
            return 0

        # by name: the workers import torch and the training code, this process need not
        jobs = [(params, args.variant, fold) for fold in folds]
        run_folds("simprop.training:train_fold", jobs, params.train.parallel_folds, [f"{args.variant} fold {f}" for f in folds])
        return 0

    scope = f" fold {args.fold}" if args.fold is not None else ""
    return run_stage(f"train {args.variant}{scope}", body)


if __name__ == "__main__":
    sys.exit(main())
