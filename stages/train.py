"""DVC stage `train@<variant>-<fold>`: train one variant on one PASCAL-5i fold.

Usage: python stages/train.py --variant simpropnet --fold 0
Outputs models/<variant>/fold<i>/ (persisted: a killed run resumes from its last
completed epoch), metrics/train/<variant>_fold<i>.json and
plots/train/<variant>_fold<i>/; everything is logged to one MLflow run.
With train.processes = N > 1 the script relaunches itself under torchrun (DDP, one
process per GPU); it can also be started by hand with
``torchrun --nproc_per_node N stages/train.py --variant ... --fold ...``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from simprop.params import Params
from simprop.stage import check_matrix_entry, matrix_args, run_stage


def main(argv: list[str] | None = None) -> int:
    args = matrix_args(__doc__, argv)

    def body(params: Params) -> int:
        check_matrix_entry(params, args.variant, args.fold)
        from simprop.timing import span

        with span("imports"):  # what this stage needs, imported once (simprop.timing)
            from simprop.distributed import context_from_env, destroy, torchrun_command, under_torchrun

        if params.train.processes > 1 and not under_torchrun():
            # train.processes > 1: relaunch this script under torchrun, one process per GPU.
            command = torchrun_command(params.train.processes, __file__, ["--variant", args.variant, "--fold", str(args.fold)])
            print("launching", " ".join(command), flush=True)
            return subprocess.call(command)

        ctx = context_from_env()

        with span("imports"):
            from simprop.tracking import stage_run
            from simprop.training import Trainer

        try:
            if not ctx.is_main:  # rank > 0: train its share of each batch; rank 0 logs and writes
                Trainer(params, args.variant, args.fold, Path("."), dist_context=ctx).run()
                return 0
            with stage_run("train", params, variant=args.variant, fold=args.fold, shots=1) as run:
                trainer = Trainer(params, args.variant, args.fold, Path("."), tracker=run, dist_context=ctx)
                run.set_tags({"device": str(trainer.device), "processes": ctx.world_size, **trainer.model.parameter_counts()})
                summary = trainer.run()
                run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
                run.log_artifact(trainer.paths.best, "checkpoint")
                run.log_artifact(trainer.paths.metrics)
                # one folder per curve: both files are named <variant>_fold<i>.csv
                run.log_artifact(trainer.paths.loss_curve, "curves/loss")
                run.log_artifact(trainer.paths.val_curve, "curves/val")
        finally:
            destroy(ctx)
        print(
            f"{args.variant} fold {args.fold}: best validation mIoU {summary['best_val_miou']:.2f} "
            f"at epoch {summary['best_epoch']} ({summary['wall_time_s']} s)"
        )
        return 0

    return run_stage(f"train {args.variant} fold {args.fold}", body)


if __name__ == "__main__":
    sys.exit(main())
