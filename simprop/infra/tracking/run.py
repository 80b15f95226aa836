"""One MLflow run per stage execution: :func:`stage_run` and the :class:`StageRun` it yields.

A run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, or SIGTERM: :mod:`.signals`); one
left RUNNING by a SIGKILLed process is closed by the next run of its stage (:mod:`.dangling`).  A
tracking server that goes away mid-run holds nothing up: :class:`StageRun` keeps the log calls it
does not take and sends them when it answers again, or saves them for ``simprop mlflow-sync``
(:func:`sync_pending`).

Runs are written through an explicit :class:`mlflow.MlflowClient`; this module sets no global
MLflow state (no ``mlflow.set_tracking_uri``, no fluent active run).  Log through the
:class:`StageRun` that :func:`stage_run` yields.  ``mlflow`` is imported lazily, so importing
this module is cheap, and ``MLFLOW_DISABLE_TELEMETRY`` defaults to ``true`` when it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from simprop.errors import DiskFullError, StageTerminated, TrackingError
from simprop.infra.atomic import is_disk_full, write_text
from simprop.infra.timing import span
from simprop.infra.tracking.dangling import close_dangling_runs, process_token, stage_key
from simprop.infra.tracking.signals import mlflow_write, raise_held, terminate_as_exception
from simprop.infra.tracking.store import (
    _mlflow,
    check_server,
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


def _log_params(client: "MlflowClient", run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(sanitize_key(k), _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _timed_logging(method):
    """Count a :class:`StageRun` method's time as MLflow logging (:mod:`simprop.infra.timing`), and
    keep the call for later when a tracking server does not take it (:meth:`StageRun.keep`)."""

    def wrapper(self, *args, **kwargs):
        with span("mlflow_logging"), mlflow_write():
            if self.pending and not self.flush():  # the server is still away: queue behind the rest
                self.keep(method.__name__, args, kwargs, None)
                return None
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - only an unreachable server is kept, the rest raises
                if isinstance(exc, OSError) and is_disk_full(Path("."), exc):  # a full local artifact store
                    raise DiskFullError(
                        f"the MLflow store of run {self.run_id} ({self.tracking_uri}, artifacts under "
                        f"mlartifacts/ unless the server keeps them) has no space left; free some space "
                        f"and rerun the stage"
                    ) from None
                if not self.is_outage(exc):
                    raise
                self.keep(method.__name__, args, kwargs, exc)
                return None

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = method.__name__, method.__doc__, method
    return wrapper


# what a tracking server that is down, restarting or overloaded raises through MLflow's client
# (after its own retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES, see store._mlflow)
_OUTAGE_TEXT = ("Max retries exceeded", "Connection refused", "Connection aborted", "Read timed out",
                "RemoteDisconnected", "Failed to establish", "502", "503", "504")  # fmt: skip


PENDING_DIR = Path(".simprop") / "mlflow-pending"  # under the repository root


class StageRun:
    """Handle on the MLflow run of one stage execution (yielded by :func:`stage_run`)."""

    def __init__(self, client: "MlflowClient", run_id: str, experiment_id: str, tracking_uri: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        # log calls a tracking server did not take, in order: (method, args, kwargs)
        self.pending: list[tuple[str, tuple, dict]] = []

    # ------------------------------------------------------------------ a server that goes away

    def is_outage(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the tracking server is unreachable (not a bad request)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return False  # a local store that fails is a real error
        text = f"{type(exc).__name__}: {exc}"
        return any(word in text for word in _OUTAGE_TEXT) or "ConnectionError" in text or "Timeout" in text

    def keep(self, method: str, args: tuple, kwargs: dict, exc: BaseException | None) -> None:
        """Queue a log call the server did not take; it is sent again before the next one and when
        the run closes (:meth:`flush`).  The work goes on: its numbers are in metrics/ anyway."""
        if not self.pending and exc is not None:
            print(f"warning: the MLflow server {self.tracking_uri} did not take a log call of run {self.run_id} "
                  f"({str(exc).splitlines()[0][:200]}); the work goes on, and the calls are kept and sent "
                  "again when it answers", file=sys.stderr, flush=True)  # fmt: skip
        self.pending.append((method, tuple(args), dict(kwargs)))

    def flush(self) -> bool:
        """Send the kept calls, in order; ``True`` when none is left."""
        while self.pending:
            method, args, kwargs = self.pending[0]
            try:
                getattr(type(self), method).__wrapped__(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                if not self.is_outage(exc):
                    raise
                return False
            self.pending.pop(0)
            if not self.pending:
                print(f"the MLflow server {self.tracking_uri} answers again: every kept log call of run "
                      f"{self.run_id} was sent", file=sys.stderr, flush=True)  # fmt: skip
        return True

    def save_pending(self, root: Path, status: str) -> Path:
        """Write the kept calls and the run's final status to ``<root>/.simprop/mlflow-pending/<run>.json``
        for :func:`sync_pending` (``simprop mlflow-sync``)."""
        path = Path(root) / PENDING_DIR / f"{self.run_id}.json"
        record = {
            "tracking_uri": self.tracking_uri, "run_id": self.run_id, "status": status,
            "calls": [{"method": m, "args": list(a), "kwargs": k} for m, a, k in self.pending],
        }  # fmt: skip
        write_text(path, json.dumps(record, default=_plain_json, indent=1) + "\n")
        return path

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
    seed: int | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    repo_root: str | os.PathLike | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution; close it FINISHED, or FAILED on an exception.

    The run is named e.g. ``train/simpropnet/fold0/seed1`` (``seed``: the training replicate) in experiment ``params.tracking.experiment``
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
    with terminate_as_exception():
        with span("mlflow_setup"), mlflow_write(held="keep"):
            client, experiment_id = open_store(uri, params.tracking.experiment, artifacts,
                                                 params.tracking.connect_timeout_s)
            name = run_name(stage, variant, fold, shots, seed)
            key = stage_key(name, root)
            tags = stage_tags(stage, params, variant=variant, fold=fold, shots=shots, seed=seed, extra_tags=extra_tags)
            tags.update({"stage_key": key[:MAX_TAG_VALUE], "process": process_token()})
            info = client.create_run(experiment_id, run_name=name, tags=tags).info
        try:
            run = StageRun(client, info.run_id, experiment_id, uri)
            raise_held()  # a signal that came while the run was being created: close it KILLED
            with span("mlflow_setup"), mlflow_write():
                replaced = close_dangling_runs(client, experiment_id, key, run.run_id)
                if replaced:
                    client.set_tag(run.run_id, "replaces_run", ",".join(replaced))
                _log_params(client, run.run_id, params.flat())
                client.log_text(run.run_id, dump_yaml(params), "params.yaml")
            yield run
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, (KeyboardInterrupt, StageTerminated)) else "FAILED"
            with contextlib.suppress(Exception), mlflow_write(held="drop"):
                client.set_tag(info.run_id, "error", f"{type(exc).__name__}: {exc}"[:MAX_TAG_VALUE])
            with contextlib.suppress(Exception), mlflow_write(held="drop"):
                client.set_terminated(info.run_id, status=status)
            raise
        with span("mlflow_close"), mlflow_write():
            _close(run, root, "FINISHED")


FLUSH_TRIES = 3  # a run that ends while its server is away: tries, FLUSH_WAIT_S apart, before saving


FLUSH_WAIT_S = 5.0


def _close(run: StageRun, root: Path, status: str) -> None:
    """Send what the server did not take and mark the run ``status``; if the server stays away,
    save both for ``simprop mlflow-sync`` and say so (the stage's outputs are complete)."""
    for attempt in range(FLUSH_TRIES):
        try:
            if run.flush():
                run.client.set_terminated(run.run_id, status=status)
                return
        except Exception as exc:  # noqa: BLE001
            if not run.is_outage(exc):
                raise
        if attempt + 1 < FLUSH_TRIES:
            time.sleep(FLUSH_WAIT_S)
    path = run.save_pending(root, status)
    print(f"warning: the MLflow server {run.tracking_uri} is still away: {len(run.pending)} log calls of run "
          f"{run.run_id} and its {status} status are saved in {path} (the stage's outputs and metrics/ "
          f"are complete); when the server answers again run: simprop mlflow-sync {path}",
          file=sys.stderr, flush=True)  # fmt: skip


def sync_pending(path: str | os.PathLike) -> int:
    """Send a run's saved log calls (:meth:`StageRun.save_pending`) and mark it with its status;
    the file is removed once everything went through.  Returns the number of calls sent."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        uri, run_id = record["tracking_uri"], record["run_id"]
    except (OSError, ValueError, KeyError) as exc:
        raise TrackingError(f"{path}: not a saved MLflow run of simprop ({exc})") from None
    check_server(uri, 10.0)
    client = _mlflow().MlflowClient(tracking_uri=uri)
    run = StageRun(client, run_id, "", uri)
    run.pending = [(c["method"], tuple(c["args"]), dict(c["kwargs"])) for c in record["calls"]]
    sent = len(run.pending)
    if not run.flush():
        raise TrackingError(f"{path}: the MLflow server {uri} did not take the calls; try again later")
    client.set_terminated(run_id, status=record["status"])
    path.unlink()
    return sent


def _plain_json(value: Any) -> Any:
    """JSON for what a log call may carry: numpy / torch scalars as numbers, paths as strings."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot save {type(value).__name__} for a later MLflow sync")
