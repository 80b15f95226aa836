"""DVC stage `train`: train every variant of train.variants on every PASCAL-5i fold of train.folds.

Usage: python stages/train.py [--variant simpropnet] [--fold 0] [--seed 1]
Each (variant, fold) is trained once per training seed of train.seeds (the replicates); each
replicate writes models/<variant>/fold<i>/seed<s>/ (persisted: a killed run resumes from its
last completed epoch, and a finished one is not trained again), metrics/train/<variant>/fold<i>/seed<s>.json
and plots/train/{loss,val}/<variant>/fold<i>/seed<s>.csv, and logs to its own MLflow run
(simprop.train.fold.train_fold).  The folds are the jobs: train.parallel_folds of them run side by
side, each in its own process (simprop/infra/parallel.py), and a fold's process trains the seeds and
variants one after another, sharing what they compute alike (simprop.train.shared.FoldShared). With
executor.kind: slurm each (variant, fold, seed) is one SLURM array task instead (simprop/infra/slurm.py);
with GPUs here, one fold's process per GPU (simprop/infra/executor.py).  --variant / --fold
/ --seed train that variant / fold / training seed alone.  With train.processes = N > 1 each (variant, fold) is trained in
turn by N DDP processes: the script relaunches itself under torchrun (one process per GPU); it can
also be started by hand with ``torchrun --nproc_per_node N stages/train.py --variant ... --fold ...``.
"""

from __future__ import annotations

import subprocess
import sys

from simprop.infra.stage import run_stage, stage_args, stage_jobs, under_torchrun
from simprop.params import Params


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, jobs=True)

    def body(params: Params) -> int:
        variants, folds, seeds = stage_jobs(params, args.variant, args.fold, args.seed)
        if params.train.processes > 1 and not under_torchrun():
            # train.processes > 1: relaunch this script under torchrun per (variant, fold, seed), one process per GPU.
            from simprop.infra.distributed import torchrun_command

            for seed in seeds:
                for variant in variants:
                    for fold in folds:
                        job = ["--params", args.params, "--variant", variant, "--fold", str(fold), "--seed", str(seed)]
                        command = torchrun_command(params.train.processes, __file__, job)
                        print("launching", " ".join(command), flush=True)
                        code = subprocess.call(command)
                        if code:
                            return code
            return 0
        if under_torchrun():  # one (variant, fold, seed) per torchrun launch: the process group is set up once
            from simprop.train.fold import train_fold

            for seed in seeds:
                for variant in variants:
                    for fold in folds:
                        train_fold(params.for_seed(seed), variant, fold)
            return 0

        from simprop.infra.executor import run_jobs

        # by name: the workers (or SLURM jobs: executor.kind) import torch and the training code, this process need not
        run_jobs("train", "simprop.train.fold:train_fold_variants", params, variants, folds, seeds,
                 params.train.parallel_folds, params.train.device)
        return 0

    scope = "".join(f" {k} {v}" for k, v in (("variant", args.variant), ("fold", args.fold), ("seed", args.seed)) if v is not None)
    return run_stage(f"train{scope}", body, args.params)


if __name__ == "__main__":
    sys.exit(main())
