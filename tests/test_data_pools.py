"""The data stages' process pools start clean children, whatever the stage's threads hold.

A stage process has threads (MLflow's, tqdm's monitor) when it builds its data. A *forked* child
inherits each lock one of them held at that moment, held for ever; one CI run of
``dvc repro download`` hung for 300 s in such a pool. The lock below stands for any of them.
"""

from __future__ import annotations

import multiprocessing
import threading

from simprop.data.progress import worker_pool

SHARED_LOCK = threading.Lock()


def try_shared_lock(_: int) -> bool:
    """In a child: can it take the module's lock within 2 s?"""
    taken = SHARED_LOCK.acquire(timeout=2.0)
    if taken:
        SHARED_LOCK.release()
    return taken


def _hold_lock(held: threading.Event, release: threading.Event) -> None:
    with SHARED_LOCK:
        held.set()
        release.wait(60)


def _map_while_another_thread_holds_the_lock(pool_factory) -> list[bool]:
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_lock, args=(held, release), daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        with pool_factory(2) as pool:
            return pool.map(try_shared_lock, range(2))
    finally:
        release.set()
        holder.join(10)


def test_a_fork_child_inherits_a_lock_another_thread_holds():
    """The hazard itself, so that the next test means something: with fork the child waits."""
    assert _map_while_another_thread_holds_the_lock(multiprocessing.get_context("fork").Pool) == [False, False]


def test_the_data_stages_pool_children_do_not():
    assert _map_while_another_thread_holds_the_lock(worker_pool) == [True, True]
