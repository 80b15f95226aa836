"""Ctrl-C and SIGTERM while a stage's MLflow run is open: the run is closed KILLED, never torn.

SIGTERM becomes :class:`~simprop.errors.StageTerminated` while a run is open.  A signal that
arrives while an MLflow write is in flight is held until that write returns: an exception raised
in the middle of a SQLite transaction left the store locked, the KILLED mark that followed failed
with "database is locked" and the run stayed RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Iterator

from simprop.errors import StageTerminated

if TYPE_CHECKING:  # pragma: no cover
    pass


_previous_handlers: list[dict[int, Any]] = []  # handlers to give back while a stage run holds the signals


_writes_in_flight: list[None] = []  # one entry per MLflow write in progress (nested calls too)


_held_signals: list[int] = []  # a signal that arrived during one, raised when the last one returns


def _child_gets_previous_handlers() -> None:
    """In a process forked while a stage run holds the signals (data workers): the handlers as
    they were, and no write in flight."""
    if _previous_handlers:
        for signum, handler in _previous_handlers[-1].items():
            signal.signal(signum, handler)
        _previous_handlers.clear()
    _writes_in_flight.clear()
    _held_signals.clear()


def _signal_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else StageTerminated(signum)


@contextlib.contextmanager
def mlflow_write(held: str = "raise") -> Iterator[None]:
    """Hold SIGTERM / SIGINT while the MLflow call inside runs; act on it when the call returns.

    The exception a signal raises lands at whatever bytecode runs next, e.g. inside SQLAlchemy
    between an INSERT and its COMMIT; that connection then keeps SQLite's write lock and the
    KILLED mark written next by the same process waits for it and fails ("database is locked").
    ``held``: ``raise`` the held signal's exception once the call has returned, ``keep`` it for
    :func:`raise_held` (the run does not exist to be closed yet), or ``drop`` it (closing a run
    that is already ending).
    """
    _writes_in_flight.append(None)
    try:
        yield
    finally:  # also when the call failed: the held signal's exception then carries its error as context
        _writes_in_flight.pop()
        if not _writes_in_flight and held == "drop":
            _held_signals.clear()
        elif not _writes_in_flight and held == "raise":
            raise_held()


def raise_held() -> None:
    """Raise the exception of a signal held by :func:`mlflow_write`, if one is."""
    if _held_signals:
        raise _signal_exception(_held_signals.pop())


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While open: SIGTERM raises :class:`StageTerminated` in this (main) thread, so the run is
    closed as KILLED, and Ctrl-C raises ``KeyboardInterrupt`` as usual (SIGINT is taken over only
    where Python's own handler had it, never where it was ignored); both wait for an MLflow
    write in flight (:func:`mlflow_write`).  Processes forked meanwhile (data workers) get the
    previous handlers back at once, so they die of SIGTERM as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a child that somehow kept this handler: behave as before
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _writes_in_flight:
            if not _held_signals:
                _held_signals.append(signum)
            return
        raise _signal_exception(signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    _previous_handlers.append(previous)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _previous_handlers.pop()
        _held_signals.clear()
