"""Run a stage's folds side by side: one process per fold at a time, each on its share of the cores.

Why: a default training step is ~100 small operators at 16-32 channels, each bound by per-call
overhead, not arithmetic, so a second thread helps one training little while two trainings of one
thread each keep most of their speed side by side (docs/studies/2026-11-27-parallel-folds.md;
docs/performance.md, "Folds side by side").
``dvc repro`` runs stages one after another, so the parallelism has to live inside a stage:
``train`` and ``evaluate`` hand their folds to :func:`run_folds`,
``train.parallel_folds`` / ``evaluate.parallel_folds`` at a time; a fold's job runs the variants in turn.

Each (variant, fold) is exactly what one ``(variant, fold)`` stage did before: its own MLflow run, its own
outputs, its own seeds (every random draw is keyed by ``(seed, fold, ...)``, never by the process
that runs it), so which worker runs a fold changes nothing but the float rounding of a different
thread count.  Workers are *spawned* (a fresh interpreter: no forked OpenMP pool, no inherited
signal handlers) and set ``torch.set_num_threads(cores // workers)``; one worker (or one fold)
runs in the stage process itself, no pool at all.

A failing fold fails the stage: its expected error (bad data, missing checkpoint, diverged loss)
comes back as :class:`FoldFailed` with the fold named, the others are stopped, and their MLflow
runs closed KILLED.  Ctrl-C and SIGTERM stop every worker the same way.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Any, Callable, Sequence

from simprop.errors import EXPECTED_ERRORS, FoldFailed, StageTerminated


def available_cores() -> int:
    """Cores this process may run on (the CPU affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """``cores // workers``, at least 1."""
    return max(1, (cores if cores is not None else available_cores()) // max(1, workers))


def _init_worker(threads: int, devices=None) -> None:
    """Set up one worker: its GPU (``devices``: a queue of ``CUDA_VISIBLE_DEVICES`` values, one per
    worker) before torch is imported, so CUDA initialises on that GPU alone; its threads; Ctrl-C."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get(timeout=60)
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C reaches the fold's MLflow run


def resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (a callable is returned as is)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _call(target: str | Callable[..., Any], args: tuple) -> tuple[str, Any]:
    """Run one job in a worker; an exception comes back as text (not every error class pickles)."""
    try:
        return "ok", resolve(target)(*args)
    except EXPECTED_ERRORS as exc:
        return "expected", f"{exc}"
    except (StageTerminated, KeyboardInterrupt) as exc:
        # The stage process is stopping this worker (Pool.terminate sends SIGTERM), and the job's
        # MLflow run turned that into an exception to close the run KILLED.  Die now: reporting it
        # as a result would put the worker back on the task queue, whose lock the terminating pool
        # holds, and Pool.terminate would then wait for it forever.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if isinstance(exc, KeyboardInterrupt) else 128 + exc.signum)
    except BaseException as exc:  # noqa: BLE001 - reported to the stage process, which fails
        return "unexpected", "".join(traceback.format_exception(exc))


def run_folds(fn: str | Callable[..., Any], jobs: Sequence[tuple], workers: int, labels: Sequence[str],
              devices: Sequence[str] = ()) -> list[Any]:  # fmt: skip
    """``[fn(*job) for job in jobs]``, ``workers`` jobs at a time in spawned processes.

    ``fn`` is a module-level function or its name, ``"package.module:function"`` (then the stage
    process never imports that module, e.g. torch, when workers do the work); ``labels`` name
    the jobs in errors (e.g. ``"fold 2"``).  With ``workers <= 1`` or a single job everything runs here, in
    order, and exceptions propagate unchanged.  Otherwise the first failing job (in job order)
    raises :class:`FoldFailed` (expected error) or ``RuntimeError`` with the worker's traceback,
    after the remaining workers were stopped.

    ``devices``: one GPU per worker (``CUDA_VISIBLE_DEVICES`` values, :func:`simprop.infra.executor.gpu_slots`):
    then ``len(devices)`` workers, each pinned to its GPU for its whole life, so at most one job per GPU runs.
    """
    if devices:
        workers = len(devices)
    workers = min(workers, len(jobs))
    if workers <= 1:
        fn = resolve(fn)
        return [fn(*job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    queue = None
    if devices:
        queue = context.Queue()
        for device in list(devices)[:workers]:
            queue.put(device)
    pool = context.Pool(workers, initializer=_init_worker, initargs=(threads_per_worker(workers), queue))
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    finished = False
    try:
        pending = [pool.apply_async(_call, (fn, job)) for job in jobs]
        results = []
        for label, handle in zip(labels, pending):
            status, value = handle.get()
            if status == "expected":
                raise FoldFailed(f"{label}: {value}")
            if status == "unexpected":
                raise RuntimeError(f"{label} failed in its worker process:\n{value}")
            results.append(value)
        pool.close()
        finished = True
        return results
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not finished:
            pool.terminate()  # SIGTERM to the workers still running: each closes its MLflow run KILLED
        pool.join()


def _raise_terminated(signum, frame) -> None:
    raise StageTerminated(signum)
