"""The ``train`` / ``evaluate`` jobs as a SLURM job array, submitted with submitit (``executor.kind: slurm``).

One array task per (variant, fold, training seed): the unit SLURM schedules, requeues and accounts
for.  Locally a fold's process runs its variants in turn to share the fold's set-up
(:class:`simprop.train.shared.FoldShared`, the evaluate stage's matcher); on a cluster that saving is
small next to spreading the matrix over every free GPU, a preempted or failed task costs one
training, not a fold's five, and each task is exactly one MLflow run, one ``models/<variant>/fold<i>/
seed<s>/`` and one log file.  The numbers are the same either way: every random draw is keyed by
(seed, fold, ...) and the shared parts are deterministic.

The stage process submits the array, then blocks until every task has ended, asking ``squeue``
every ``executor.slurm.poll_s`` seconds (a task has ended when SLURM no longer lists it; one that ends without a result was cancelled, ran out of time or memory, or lost
its node).  Every failed task is reported
with its label, SLURM job id and stdout/stderr files, and the stage fails (:class:`FoldFailed`, exit
status 2).  Ctrl-C or SIGTERM cancels the array (``scancel``), waits for SLURM to drop it, and the
stage exits 130 / 143.

Each task runs ``python -m submitit.core._submit`` with this very interpreter (submitit's default),
``PYTHONPATH`` starting at the stage's repository root (the code DVC hashed, also in a ``dvc exp run``
temporary copy) and that root as working directory, so its outputs land exactly where the local
executor writes them (the cluster's file system is shared).  :class:`SlurmJob` is checkpointable the
submitit way: on the time-limit signal submitit calls :meth:`SlurmJob.checkpoint` and requeues the
task, which then resumes from ``last.pt`` like any restarted training (the pattern of
facebookresearch/dino's and facebookresearch/mae's ``submitit_*.py`` ``Trainer.checkpoint``, minus
their resume bookkeeping: our trainer finds ``last.pt`` itself).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simprop.errors import FoldFailed, ParamsError, StageTerminated
from simprop.infra.parallel import available_cores, resolve
from simprop.infra.tracking.tags import EXECUTOR_ENV
from simprop.params import SlurmParams

SQUEUE_TIMEOUT_S = 60.0
CANCEL_WAIT_S = 120.0
MISSING_POLLS = 2  # polls a task must be absent from squeue, without a result, before it counts as ended


@dataclass(frozen=True)
class SlurmJobSpec:
    label: str  # e.g. "simpropnet fold 0 seed 1": names the task in messages
    args: tuple  # the arguments of the stage's job function


class SlurmJob:
    """What each array task runs: ``target(*args)`` in the repository ``root`` with the task's cores as
    torch threads; checkpointable (submitit calls :meth:`checkpoint` on the time-limit / preemption signal
    and requeues the returned submission)."""

    def __init__(self, target: str, root: str) -> None:
        self.target = target
        self.root = root

    def __call__(self, *args: Any) -> Any:
        os.chdir(self.root)
        os.environ[EXECUTOR_ENV] = "slurm"
        if self.root not in sys.path:
            sys.path.insert(0, self.root)
        import torch

        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK") or available_cores()))
        return resolve(self.target)(*args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The same job again: training resumes from ``last.pt`` (a finished one is not retrained)."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.target, self.root), *args, **kwargs)


def log_folder(settings: SlurmParams, root: Path, stage: str) -> Path:
    """submitit's folder for ``stage``: ``<log_dir>/<stage>`` (``log_dir`` relative to the repository)."""
    return (root / settings.log_dir / stage).absolute()


def make_executor(settings: SlurmParams, folder: Path, root: Path, stage: str):
    """A submitit executor for one array of ``stage`` jobs with the ``executor.slurm`` settings."""
    if shutil.which("sbatch") is None:
        raise ParamsError(
            "executor.kind: slurm, but there is no sbatch on this machine's PATH; run the stage on a "
            "SLURM login node or set executor.kind: local"
        )
    try:
        import submitit
    except ImportError:  # pragma: no cover - the cluster extra installs it
        raise ParamsError("executor.kind: slurm needs submitit: pip install -e '.[cluster]'") from None
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    setup = [
        f"export PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export {EXECUTOR_ENV}=slurm",
        f"cd {shlex.quote(str(root))}",
        *settings.setup,
    ]
    options: dict[str, Any] = {
        "name": f"simprop-{stage}", "timeout_min": settings.time_min, "nodes": 1, "tasks_per_node": 1,
        "cpus_per_task": settings.cpus_per_job, "slurm_array_parallelism": settings.array_parallelism,
        "slurm_setup": setup, "slurm_additional_parameters": dict(settings.additional),
    }  # fmt: skip
    if settings.gpus_per_job:
        options["gpus_per_node"] = settings.gpus_per_job
    if settings.mem_gb:
        options["mem_gb"] = settings.mem_gb
    for name in ("partition", "account", "qos"):
        if getattr(settings, name):
            options[f"slurm_{name}"] = getattr(settings, name)
    executor.update_parameters(**options)
    return executor


def run_on_slurm(stage: str, target: str, specs: Sequence[SlurmJobSpec], settings: SlurmParams, root: Path) -> list:
    """Submit one array task per spec running ``target(*spec.args)``, wait for all, and return their
    results in spec order; raise :class:`FoldFailed` naming every failed task, its SLURM job id and log
    files.  Ctrl-C / SIGTERM: the array is cancelled before the exception propagates."""
    root = root.absolute()
    folder = log_folder(settings, root, stage)
    executor = make_executor(settings, folder, root, stage)
    columns = [list(column) for column in zip(*(spec.args for spec in specs))]
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    jobs: list = []
    try:
        jobs = executor.map_array(SlurmJob(target, str(root)), *columns)
        arrays = sorted({job.job_id.split("_")[0] for job in jobs})
        print(f"{stage}: submitted {len(jobs)} SLURM jobs (array {', '.join(arrays)}); logs in {folder}", flush=True)
        _wait(jobs, arrays, settings.poll_s)
    except (KeyboardInterrupt, StageTerminated):
        if jobs:
            cancel(sorted({job.job_id.split("_")[0] for job in jobs}), stage)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _results(stage, jobs, specs)


def queued(arrays: Sequence[str]) -> set[str] | None:
    """The task ids (``<array>_<task>``) of ``arrays`` that SLURM still lists (pending, running,
    completing, requeued); ``None`` when ``squeue`` did not answer (try again later)."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)], check=False, capture_output=True,
                             text=True, timeout=SQUEUE_TIMEOUT_S)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # a finished array that slurmctld has already purged (MinJobAge) is an "invalid job id"
        return set() if "Invalid job id" in out.stderr else None
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def _wait(jobs: Sequence, arrays: Sequence[str], poll_s: float) -> None:
    """Until SLURM lists none of ``jobs`` any more.  A task absent from ``squeue`` without a result file
    must stay absent for :data:`MISSING_POLLS` polls (a requeued task passes through states briefly)."""
    missing = {job.job_id: 0 for job in jobs}
    pending = list(jobs)
    while pending:
        listed = queued(arrays)
        still = []
        for job in pending:
            if listed is None or job.job_id in listed:
                missing[job.job_id] = 0
                still.append(job)
                continue
            missing[job.job_id] += 1
            if not job.paths.result_pickle.exists() and missing[job.job_id] < MISSING_POLLS:
                still.append(job)
        pending = still
        if pending:
            time.sleep(poll_s)


def _results(stage: str, jobs: Sequence, specs: Sequence[SlurmJobSpec]) -> list:
    results, failures = [], []
    for job, spec in zip(jobs, specs):
        if not job.paths.result_pickle.exists():
            reason = "ended without a result (cancelled, out of time or memory, or its node failed)"
        else:
            outcome, value = _read(job)
            if outcome == "success":
                results.append(value)
                continue
            reason = _last_line(value)
        failures.append(
            f"{spec.label} (SLURM job {job.job_id}): {reason}\n"
            f"    stdout: {job.paths.stdout}\n    stderr: {job.paths.stderr}"
        )
    if failures:
        raise FoldFailed(
            f"{len(failures)} of {len(jobs)} SLURM jobs of the {stage} stage failed:\n" + "\n".join(failures)
        )
    return results


def _read(job) -> tuple[str, Any]:
    """submitit's result file: ``("success", value)`` or ``("error", traceback text)``."""
    from submitit.core import utils

    return utils.pickle_load(job.paths.result_pickle)


def _last_line(text: Any) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def cancel(arrays: Sequence[str], stage: str) -> None:
    """``scancel`` the arrays and wait (bounded) until ``squeue`` no longer lists them."""
    print(f"{stage}: cancelling SLURM array {', '.join(arrays)}", file=sys.stderr, flush=True)
    try:
        subprocess.run(["scancel", *arrays], check=False, capture_output=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"{stage}: scancel {' '.join(arrays)} failed ({exc}); cancel them by hand", file=sys.stderr)
        return
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        if queued(arrays) == set():
            return
        time.sleep(1.0)
    print(f"{stage}: SLURM still lists jobs of array {', '.join(arrays)} after {CANCEL_WAIT_S:.0f} s", file=sys.stderr)


def _raise_terminated(signum, frame) -> None:
    raise StageTerminated(signum)
