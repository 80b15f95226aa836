"""One MLflow run per stage execution: :func:`stage_run` and the :class:`StageRun` it yields.

No dangling runs
----------------
A run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, or SIGTERM, which
:func:`stage_run` turns into :class:`StageTerminated`).  A process killed with SIGKILL cannot
close its run; the next run of the same stage key (``stage_key`` tag: run name, DVC experiment
and repository) closes every RUNNING run of that key whose process is gone as KILLED, tagged
``replaced_by_run``; the new run is tagged ``replaces_run``.  A run whose process (``process``
tag: host, pid and start time) is still alive is left alone.
A SIGTERM or Ctrl-C that arrives while an MLflow write is in flight is held until that write
returns: an exception raised in the middle of a SQLite transaction left the store locked, the
KILLED mark that followed failed with "database is locked" and the run stayed RUNNING.

Runs are written through an explicit :class:`mlflow.MlflowClient`; this module sets no global
MLflow state (no ``mlflow.set_tracking_uri``, no fluent active run).  Log through the
:class:`StageRun` that :func:`stage_run` yields.  ``mlflow`` is imported lazily, so importing
this module is cheap, and ``MLFLOW_DISABLE_TELEMETRY`` defaults to ``true`` when it is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from simprop.errors import StageTerminated
from simprop.infra.timing import span
from simprop.infra.tracking.store import (
    _mlflow,
    find_repo_root,
    open_store,
    resolve_tracking,
)
from simprop.infra.tracking.tags import (
    MAX_TAG_VALUE,
    _join,
    _param_value,
    flatten_metrics,
    run_name,
    sanitize_key,
    stage_tags,
)
from simprop.params import Params, dump_yaml

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient



def _process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or ``""``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 (starttime), after the command name


def process_token(pid: int | None = None) -> str:
    """``host:pid:start``: names this process so that a later run can tell whether it still lives."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def process_alive(token: str) -> bool:
    """Whether the process a :func:`process_token` names still runs (on another host: assume so)."""
    try:
        host, pid_text, start = token.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # cannot tell; never close another machine's run
    if start:
        return _process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stage_key(name: str, repo_root: Path) -> str:
    """What makes two runs "the same stage": run name, DVC experiment, repository."""
    return f"{name}|{os.environ.get('DVC_EXP_NAME') or 'workspace'}|{repo_root}"


def close_dangling_runs(client: "MlflowClient", experiment_id: str, key: str, replaced_by: str) -> list[str]:
    """Close as KILLED every RUNNING run of stage key ``key`` whose process is gone.

    Each gets the tags ``replaced_by_run`` (``replaced_by``) and ``killed_reason``; returns their ids.
    """
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    closed = []
    for run in runs:
        if run.data.tags.get("stage_key") != key or run.info.run_id == replaced_by:
            continue
        if process_alive(run.data.tags.get("process", "")):
            continue
        client.set_tag(run.info.run_id, "replaced_by_run", replaced_by)
        client.set_tag(
            run.info.run_id, "killed_reason",
            "its process ended without closing the run (SIGKILL, power loss); found RUNNING when the stage started again",
        )  # fmt: skip
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_child_gets_previous_handlers)


def _signal_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else StageTerminated(signum)


@contextlib.contextmanager
def _mlflow_write(held: str = "raise") -> Iterator[None]:
    """Hold SIGTERM / SIGINT while the MLflow call inside runs; act on it when the call returns.

    The exception a signal raises lands at whatever bytecode runs next, e.g. inside SQLAlchemy
    between an INSERT and its COMMIT; that connection then keeps SQLite's write lock and the
    KILLED mark written next by the same process waits for it and fails ("database is locked").
    ``held``: ``raise`` the held signal's exception once the call has returned, ``keep`` it for
    :func:`_raise_held` (the run does not exist to be closed yet), or ``drop`` it (closing a run
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
            _raise_held()


def _raise_held() -> None:
    """Raise the exception of a signal held by :func:`_mlflow_write`, if one is."""
    if _held_signals:
        raise _signal_exception(_held_signals.pop())


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """While open: SIGTERM raises :class:`StageTerminated` in this (main) thread, so the run is
    closed as KILLED, and Ctrl-C raises ``KeyboardInterrupt`` as usual (SIGINT is taken over only
    where Python's own handler had it, never where it was ignored); both wait for an MLflow
    write in flight (:func:`_mlflow_write`).  Processes forked meanwhile (data workers) get the
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


def _log_params(client: "MlflowClient", run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(sanitize_key(k), _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _timed_logging(method):
    """Count a :class:`StageRun` method's time as MLflow logging (:mod:`simprop.infra.timing`)."""

    def wrapper(*args, **kwargs):
        with span("mlflow_logging"), _mlflow_write():
            return method(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


class StageRun:
    """Handle on the MLflow run of one stage execution (yielded by :func:`stage_run`)."""

    def __init__(self, client: "MlflowClient", run_id: str, experiment_id: str, tracking_uri: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    @_timed_logging
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log a (possibly nested) dict of numbers; names are sanitised (``@``, ``()`` -> ``_``)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(sanitize_key(k), v, now, int(step or 0))
            for k, v in flatten_metrics(metrics).items()
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        self.log_metrics({name: value}, step=step)

    @_timed_logging
    def log_history(self, name: str, steps: Sequence[int], values: Sequence[float]) -> None:
        """Log a whole series (e.g. the per-step training loss) in a few batched calls."""
        from mlflow.entities import Metric

        if len(steps) != len(values):
            raise ValueError(f"log_history({name!r}): {len(steps)} steps but {len(values)} values")
        key = sanitize_key(name)
        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, int(s)) for s, v in zip(steps, values)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    @_timed_logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified; lists as JSON).  MLflow params are immutable."""
        _log_params(self.client, self.run_id, params)

    @_timed_logging
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(sanitize_key(k), _join(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    @_timed_logging
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (e.g. a checkpoint: plain artifact, never ``log_model``) into the run."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_timed_logging
    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"artifact directory {directory} does not exist")
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    @_timed_logging
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` as JSON (or YAML for ``.yaml``/``.yml``) into the run's artifacts."""
        self.client.log_dict(self.run_id, obj, artifact_file)

    @_timed_logging
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: "Params",
    *,
    variant: str | None = None,
    fold: int | None = None,
    shots: Any = None,
    extra_tags: Mapping[str, Any] | None = None,
    repo_root: str | os.PathLike | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution; close it FINISHED, or FAILED on an exception.

    The run is named e.g. ``train/simpropnet/fold0`` in experiment ``params.tracking.experiment``
    (created with its artifact location under the original repo root), tagged per the tracking
    contract (:func:`stage_tags`) and given every flattened param (``params.flat()``); the
    composed params are also stored as the artifact ``params.yaml``.  An exception propagates
    after the run is marked FAILED (KILLED for Ctrl-C and SIGTERM, which raises
    :class:`StageTerminated` while the run is open) with its message in the ``error`` tag.  The
    store is opened by :func:`open_store` (safe for parallel stages); a RUNNING run of the same
    stage key whose process is gone is closed as KILLED (:func:`close_dangling_runs`).
    """
    root = find_repo_root(repo_root)
    uri, artifacts = resolve_tracking(repo_root, params.tracking.tracking_uri, params.tracking.experiment)
    _mlflow()
    with _terminate_as_exception():
        with span("mlflow_setup"), _mlflow_write(held="keep"):
            client, experiment_id = open_store(uri, params.tracking.experiment, artifacts)
            name = run_name(stage, variant, fold, shots)
            key = stage_key(name, root)
            tags = stage_tags(stage, params, variant=variant, fold=fold, shots=shots, extra_tags=extra_tags)
            tags.update({"stage_key": key[:MAX_TAG_VALUE], "process": process_token()})
            info = client.create_run(experiment_id, run_name=name, tags=tags).info
        try:
            run = StageRun(client, info.run_id, experiment_id, uri)
            _raise_held()  # a signal that came while the run was being created: close it KILLED
            with span("mlflow_setup"), _mlflow_write():
                replaced = close_dangling_runs(client, experiment_id, key, run.run_id)
                if replaced:
                    client.set_tag(run.run_id, "replaces_run", ",".join(replaced))
                _log_params(client, run.run_id, params.flat())
                client.log_text(run.run_id, dump_yaml(params), "params.yaml")
            yield run
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, (KeyboardInterrupt, StageTerminated)) else "FAILED"
            with contextlib.suppress(Exception), _mlflow_write(held="drop"):
                client.set_tag(info.run_id, "error", f"{type(exc).__name__}: {exc}"[:MAX_TAG_VALUE])
            with contextlib.suppress(Exception), _mlflow_write(held="drop"):
                client.set_terminated(info.run_id, status=status)
            raise
        with span("mlflow_close"), _mlflow_write():
            client.set_terminated(run.run_id, status="FINISHED")

