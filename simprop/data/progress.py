"""Progress bars that stay readable in a terminal and in CI logs."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tqdm import tqdm


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    unit_scale: bool = False,
    initial: float = 0,
    enabled: bool = True,
) -> tqdm:
    """A tqdm bar on stderr: refreshed twice a second in a terminal, every 30 s in a log file."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        initial=initial,
        disable=not enabled,
        mininterval=0.5 if interactive else 30.0,
        dynamic_ncols=interactive,
        file=sys.stderr,
    )


def resolve_workers(workers: int) -> int:
    """``data.workers``: 0 means every core this process may run on."""
    if workers > 0:
        return workers
    try:
        import os

        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        import os

        return max(1, os.cpu_count() or 1)


def worker_pool(processes: int):
    """A ``multiprocessing`` pool for the data stages' per-image work, started with *spawn*.

    Not the Linux default *fork*: a stage process has threads by the time it builds its data
    (the open MLflow run's, tqdm's monitor), and a forked child
    inherits every lock those threads held at that moment, held by nobody, so it can wait on one
    for ever. One CI run of ``dvc repro download`` hung in such a pool for 300 s (CHANGELOG).
    CPython warns about forking a threaded process from 3.12 and no longer forks by default on
    POSIX from 3.14 for this reason; the fold workers already spawn (:mod:`simprop.infra.parallel`).
    Spawn costs each worker a fresh interpreter (~1 s) and requires picklable work: module-level
    functions and :func:`functools.partial` of them.
    """
    return multiprocessing.get_context("spawn").Pool(processes)


def map_unordered(work: Callable[[Any], Any], items: Sequence[Any], workers: int, *, per_worker: int,
                  chunksize: int) -> Iterator[Any]:  # fmt: skip
    """``work`` of each of ``items``, results in any order: the data stages' per-image map.

    ``data.workers`` processes (:func:`resolve_workers`), but no more than one per ``per_worker``
    items (a pool costs each worker an interpreter start), in a :func:`worker_pool`; one means
    here, in this process, in order.
    """
    processes = min(resolve_workers(workers), max(1, len(items) // per_worker))
    if processes == 1:
        yield from map(work, items)
        return
    with worker_pool(processes) as pool:
        yield from pool.imap_unordered(work, items, chunksize=chunksize)
