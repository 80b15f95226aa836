"""What every DVC stage entry point shares: load params, run, turn known errors into messages.

A stage script is ``sys.exit(run_stage("train", body, argv))``: params are
validated before ``body`` does any work, and an expected failure (bad params,
missing or corrupt input, a diverged training, an unusable MLflow store) prints one
clear line naming the file or key and exits with status 2 instead of a traceback.
Ctrl-C and SIGTERM end the stage with status 130 / 143 after its MLflow run was
closed as KILLED.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

from simprop.errors import EXPECTED_ERRORS, ParamsError, StageTerminated
from simprop.infra.timing import CLOCK
from simprop.params import Params, load_params


def stage_parser(doc: str, *, jobs: bool = False, root: bool = False) -> argparse.ArgumentParser:
    """The command line every stage script shares: ``--params`` (default ``params.yaml``); with
    ``root``, ``--root`` (the repository root its inputs and outputs live under); with ``jobs``,
    ``--variant``, ``--fold`` and ``--seed`` (all optional: one (variant, fold, training seed) of
    the ``train`` / ``evaluate`` matrix).  A stage that needs one more option adds it to the parser."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    if root:
        parser.add_argument("--root", default=".", help="repository root (data/, models/, metrics/, reports/)")
    if jobs:
        parser.add_argument("--variant", help="only this variant (default: every variant of train.variants)")
        parser.add_argument("--fold", type=int, help="only this fold (default: every fold of train.folds)")
        parser.add_argument("--seed", type=int, help="only this training seed (default: every seed of train.seeds)")
    return parser


def stage_args(doc: str, argv: list[str] | None = None, *, jobs: bool = False, root: bool = False) -> argparse.Namespace:
    """:func:`stage_parser`'s options parsed from ``argv`` (default: the command line)."""
    return stage_parser(doc, jobs=jobs, root=root).parse_args(argv)


def run_analysis_stage(name: str, description: str, analyse: Callable[[Params, Path], int | None],
                       argv: list[str] | None = None) -> int:
    """Entry point of an analysis stage: :func:`stage_args` with ``--root``, then :func:`run_stage`.

    ``analyse(params, root)`` runs inside the stage's MLflow run; an expected failure
    (e.g. :class:`~simprop.errors.AnalysisError`) has already marked that run FAILED
    when it reaches here, and becomes one clear line and exit status 2.
    """
    args = stage_args(description, argv, root=True)
    return run_stage(name, lambda params: analyse(params, Path(args.root)), args.params)


def under_torchrun() -> bool:
    """Whether torchrun started this process (it sets ``WORLD_SIZE`` for every worker); here, not
    in :mod:`simprop.infra.distributed`, so that a stage can ask before importing torch."""
    return "WORLD_SIZE" in os.environ


def stage_jobs(params: Params, variant: str | None, fold: int | None,
               seed: int | None = None) -> tuple[list[str], list[int], list[int]]:  # fmt: skip
    """The variants, folds and training seeds a ``train`` / ``evaluate`` run covers: ``variant`` /
    ``fold`` / ``seed`` alone, or every one of ``train.variants`` / ``train.folds`` /
    ``train.seeds``; what is asked for must be in those lists."""
    if (variant is not None and variant not in params.train.variants) or (fold is not None and fold not in params.train.folds):
        what = variant if fold is None else f"fold {fold}" if variant is None else f"({variant}, fold {fold})"
        raise ParamsError(f"train.variants/train.folds: {what} is not in the params lists")
    if seed is not None and seed not in params.train.seeds:
        raise ParamsError(f"train.seeds: training seed {seed} is not in {list(params.train.seeds)}")
    variants = list(params.train.variants) if variant is None else [variant]
    seeds = list(params.train.seeds) if seed is None else [seed]
    return variants, (list(params.train.folds) if fold is None else [fold]), seeds


def run_stage(name: str, body: Callable[[Params], int | None], params_path: str | Path = "params.yaml") -> int:
    CLOCK.enter = time.time()
    status = "error"
    try:
        code = _run_stage(name, body, params_path)
        status = "ok" if code == 0 else f"exit {code}"
        return code
    finally:
        CLOCK.record(name, status)


def _run_stage(name: str, body: Callable[[Params], int | None], params_path: str | Path) -> int:
    try:
        params = load_params(params_path)
    except ParamsError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return body(params) or 0
    except EXPECTED_ERRORS as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, StageTerminated) as exc:  # the stage's MLflow run is already KILLED
        why = "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"{name}: {why}; its MLflow run is marked KILLED and its temporary outputs removed", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + exc.signum
