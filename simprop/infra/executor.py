"""Where the ``train`` and ``evaluate`` stages run their jobs: here, or on SLURM (``executor.kind``).

``local`` (the default) is :func:`simprop.infra.parallel.run_folds`: one job per fold (its seeds and
variants in turn), ``train.parallel_folds`` / ``evaluate.parallel_folds`` at a time, each in a spawned
worker with ``cores // workers`` threads.  On a machine with CUDA GPUs and a stage device of ``auto`` or
``cuda``, the workers are one per GPU instead, each pinned to its GPU with ``CUDA_VISIBLE_DEVICES``
before torch initialises CUDA in it (:func:`gpu_slots`): one job per GPU at a time, and a job's
``cuda`` is its own GPU.  ``cuda:N`` is the user's explicit choice and is left alone (no pinning).

``slurm`` (:mod:`simprop.infra.slurm`) submits one array task per (variant, fold, training seed).

Why the executor is not a DVC param of any stage: a job writes the same files wherever it runs (its
random draws are keyed by (seed, fold, ...), never by the process), so moving the jobs must neither
rerun nor invalidate anything (``dvc.yaml`` lists ``train.*`` / ``evaluate.*`` keys, never ``executor``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simprop.infra.parallel import run_folds
from simprop.infra.slurm import SlurmJobSpec, run_on_slurm
from simprop.params import Params

NVIDIA_SMI_TIMEOUT_S = 10.0


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The CUDA GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` values, without importing torch
    (the stage process never does): ``CUDA_VISIBLE_DEVICES`` when set (CUDA stops at the first
    invalid entry, e.g. ``-1``); else ``nvidia-smi``'s GPU indices; else one per
    ``/proc/driver/nvidia/gpus`` entry; else none."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        gpus = []
        for item in environ["CUDA_VISIBLE_DEVICES"].split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break
            gpus.append(item)
        return gpus
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], check=False,
                                 capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)  # fmt: skip
            if out.returncode == 0:
                return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    proc = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(proc.iterdir())))] if proc.is_dir() else []


def gpu_slots(device: str, gpus: Sequence[str]) -> list[str]:
    """The GPU of each local worker: every visible GPU when the stage's ``device`` may be CUDA
    (``auto`` or ``cuda``) and there is one; else none (the CPU path, exactly as before; ``cuda:N``
    names one GPU itself)."""
    return list(gpus) if device in ("auto", "cuda") else []


def run_jobs(stage: str, target: str, params: Params, variants: list[str], folds: list[int], seeds: list[int],
             parallel: int, device: str) -> list[Any]:  # fmt: skip
    """Run ``target(params, variants, fold, ".", seeds)`` for the stage's (variant, fold, seed) matrix
    where ``executor.kind`` says.  ``target`` is ``"module:function"`` (e.g.
    ``simprop.train.fold:train_fold_variants``); ``parallel`` is the stage's ``parallel_folds`` and
    ``device`` its device param.  Returns the jobs' results (one list per job)."""
    if params.executor.kind == "slurm":
        specs = [
            SlurmJobSpec(f"{variant} fold {fold} seed {seed}", (params, [variant], fold, ".", [seed]))
            for seed in seeds for variant in variants for fold in folds
        ]  # fmt: skip
        return run_on_slurm(stage, target, specs, params.executor.slurm, Path.cwd())

    jobs = [(params, variants, fold, ".", seeds) for fold in folds]
    devices = gpu_slots(device, visible_gpus() if device in ("auto", "cuda") else [])  # no nvidia-smi for cpu
    return run_folds(target, jobs, parallel, [f"fold {f}" for f in folds], devices=devices)
