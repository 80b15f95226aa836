"""The ``train`` stage's jobs: the variants of one fold trained in turn in one process, each in
its own MLflow run, sharing what the fold's trainings compute alike (:class:`FoldShared`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from simprop.infra.device import precision
from simprop.infra.distributed import (
    context_from_env,
    destroy,
)
from simprop.infra.tracking import stage_run
from simprop.model import VARIANTS as VARIANT_SPECS
from simprop.params import Params
from simprop.train.shared import FoldShared
from simprop.train.trainer import Trainer


def train_fold_variants(params: Params, variants: list[str], fold: int, root: Path | str = ".",
                        seeds: list[int] | None = None) -> list[dict]:  # fmt: skip
    """The ``train`` stage's job for one fold: every training seed of ``seeds`` (default
    ``train.seeds``) and every variant of ``variants`` in turn, each replicate in its own MLflow run
    (:func:`train_fold`), sharing what the fold's trainings compute alike (:class:`FoldShared`).
    Module-level so that :func:`simprop.infra.parallel.run_folds` can run it in a worker process.
    Returns the summaries in (seed, variant) order."""
    shared = FoldShared(gray=any(VARIANT_SPECS[v].ica for v in variants))
    seeds = list(params.train.seeds) if seeds is None else seeds
    return [train_fold(params.for_seed(seed), variant, fold, root, shared=shared) for seed in seeds for variant in variants]


def train_fold(params: Params, variant: str, fold: int, root: Path | str = ".", shared: FoldShared | None = None) -> dict:
    """One (variant, fold) training of the ``train`` stage with training seed ``params.train.seed``
    (:meth:`Params.for_seed`), in its own MLflow run.

    Under torchrun every rank calls it, rank 0 alone logs and writes.  Returns the summary
    (best validation mIoU and epoch, wall time, ...) on rank 0, ``{}`` on the others.
    ``shared``: what an earlier training of this fold in this process computed (:class:`FoldShared`).
    """

    root = Path(root)
    ctx = context_from_env()
    try:
        if not ctx.is_main:  # rank > 0: train its share of each batch; rank 0 logs and writes
            Trainer(params, variant, fold, root, dist_context=ctx, shared=shared).run()
            return {}
        with stage_run("train", params, variant=variant, fold=fold, shots=1, seed=params.train.seed) as run:
            trainer = Trainer(params, variant, fold, root, tracker=run, dist_context=ctx, shared=shared)
            run.set_tags({
                "device": str(trainer.device), "processes": ctx.world_size, "torch_threads": torch.get_num_threads(),
                "precision": precision(trainer.device, trainer.amp), **trainer.model.parameter_counts(),
            })  # fmt: skip
            summary = trainer.run()
            # the encoder conv's forms that ran (model.conv_kernel; "auto" decides per machine and shape)
            run.set_tags({"conv_kernel": params.model.conv_kernel, "conv_kernel_used": summary["conv_kernel"]["used"]})
            # numbers only: amp is a bool (an int to Python), conv_kernel and machine are blocks
            numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            run.log_metrics(numbers)
            run.log_artifact(trainer.paths.best, "checkpoint")
            run.log_artifact(trainer.paths.train_metrics)
            # one folder per curve: both files are named seed<s>.csv
            run.log_artifact(trainer.paths.loss_curve, "curves/loss")
            run.log_artifact(trainer.paths.val_curve, "curves/val")
    finally:
        destroy(ctx)
    print(
        f"{variant} fold {fold} seed {params.train.seed}: best validation mIoU {summary['best_val_miou']:.2f} "
        f"at epoch {summary['best_epoch']} ({summary['wall_time_s']} s)",
        flush=True,
    )
    return summary
