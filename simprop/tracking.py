"""MLflow tracking: one run per stage execution (docs/architecture.md, "Tracking contract").

Where runs go
-------------
:func:`resolve_tracking` picks the store, first match wins:

1. ``tracking.tracking_uri`` from params.yaml, when not empty;
2. the ``MLFLOW_TRACKING_URI`` environment variable;
3. ``sqlite:///<repo root>/mlflow.db``.

Artifacts of experiments this module creates go to ``<repo root>/mlartifacts/<experiment>``
unless the store is a tracking server (``http(s)://``), which then decides.  A relative
``sqlite:///mlflow.db`` or ``file:`` URI is resolved against the repo root, not the cwd.

"Repo root" is always the *original* repository: ``dvc exp run --temp`` runs stages in
``<repo>/.dvc/tmp/exps/standalone/tmpXXXX/`` and ``--queue`` in ``<repo>/.dvc/tmp/exps/tmpXXXX/``
(each a full git + dvc checkout of its own, deleted afterwards; DVC 3.67 sets ``DVC_ROOT`` to
the original repo), so a store or artifact root derived from the cwd would vanish with it.
:func:`find_repo_root` strips everything from ``.dvc/tmp/exps`` on.

Parallel stages, one store
--------------------------
A new sqlite store is created (and an old one migrated) by MLflow on first use; two processes
doing that at once (``dvc queue start --jobs 2`` on a fresh clone) corrupt it.  :func:`open_store`
therefore opens the store and gets or creates the experiment under an exclusive ``fcntl.flock``
on ``<store>.lock`` beside the sqlite file: the first process creates and migrates, the others
wait for it and then find a ready store.  The experiment is created with the tag
``mlflow.experimentKind=custom_model_development`` (set on an existing one that lacks it), so
MLflow 3's UI opens it on the runs table rather than the GenAI overview.

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
import fcntl
import json
import numbers
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from simprop.timing import span

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

    from simprop.params import Params

_EXPS_PARTS = (".dvc", "tmp", "exps")
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000


def _mlflow():
    """Import mlflow on first use, with telemetry off unless the caller chose otherwise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with span("mlflow_import"):
        import mlflow

    return mlflow


# --------------------------------------------------------------------------- locations


def original_repo_root(path: str | os.PathLike) -> Path | None:
    """The repo a DVC temporary experiment copy belongs to, or ``None`` if ``path`` is not in one.

    ``/repo/.dvc/tmp/exps/standalone/tmpab12/src`` -> ``/repo``.
    """
    parts = Path(path).absolute().parts
    for i in range(len(parts) - len(_EXPS_PARTS) + 1):
        if parts[i : i + len(_EXPS_PARTS)] == _EXPS_PARTS:
            return Path(*parts[:i])
    return None


def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The original repository root for the tracking store and artifacts.

    ``start`` given: that directory (or the repo it is a temp-experiment copy of).  Otherwise:
    the repo whose temp-experiment copy holds the cwd; else ``$DVC_ROOT`` (likewise mapped);
    else the nearest parent of the cwd holding ``.dvc`` or ``.git``; else the cwd.
    """
    if start is not None:
        start = Path(start).absolute()
        return original_repo_root(start) or start
    cwd = Path.cwd().absolute()
    root = original_repo_root(cwd)
    if root is not None:
        return root
    env_root = os.environ.get("DVC_ROOT")
    if env_root:
        return original_repo_root(env_root) or Path(env_root).absolute()
    for parent in (cwd, *cwd.parents):
        if (parent / ".dvc").is_dir() or (parent / ".git").exists():
            return parent
    return cwd


def resolve_tracking(
    repo_root: str | os.PathLike | None = None,
    tracking_uri: str = "",
    experiment: str | None = None,
) -> tuple[str, str | None]:
    """``(tracking_uri, artifact_location)`` for this execution.

    ``tracking_uri`` is the ``tracking.tracking_uri`` param (empty = not set).  The artifact
    location is ``file://<repo root>/mlartifacts`` (``/<experiment>`` appended when given), or
    ``None`` for a tracking server, which stores artifacts where it was configured to.
    """
    root = find_repo_root(repo_root)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{root / 'mlflow.db'}"
    uri = _anchor_relative_uri(uri, root)
    if uri.split(":", 1)[0].lower() in ("http", "https", "databricks"):
        return uri, None
    artifacts = root / "mlartifacts"
    if experiment:
        artifacts = artifacts / _safe_path_component(experiment)
    return uri, artifacts.as_uri()


def _anchor_relative_uri(uri: str, root: Path) -> str:
    """Resolve ``sqlite:///rel.db`` / ``file:rel`` / a bare relative path against ``root``."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        if rel and not rel.startswith(":memory:") and not Path(rel).is_absolute():
            return f"sqlite:///{root / rel}"
        return uri
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return (root / uri[len("file:") :]).as_uri()
    if "://" not in uri and not uri.startswith(("file:", "sqlite:")) and not Path(uri).is_absolute():
        return str(root / uri)
    return uri


def _safe_path_component(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip(".") or "experiment"


# --------------------------------------------------------------------------- names and values


def sanitize_key(name: str) -> str:
    """A metric/param/tag name MLflow accepts: ``miou@1shot(fold0)`` -> ``miou_1shot_fold0``.

    Allowed characters are letters, digits, ``_ - . /`` and space; anything else becomes ``_``;
    empty, ``.`` and ``..`` path segments are dropped; at most 250 characters.
    """
    text = re.sub(r"[^\w.\-/ ]+", "_", str(name)).strip("_")
    segments = [s for s in text.split("/") if s not in ("", ".", "..")]
    text = "/".join(s.strip() or "_" for s in segments)
    return (text or "_")[:_MAX_KEY]


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = json.dumps(list(value))
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return text[:_MAX_PARAM_VALUE]


def flatten_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict of numbers -> ``{"a.b": float}``; ``None`` leaves are skipped.

    Raises ``TypeError`` for a non-numeric leaf, naming it.
    """
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name))
        elif value is None:
            continue
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[name] = float(value)
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
            out[name] = float(value.item())
        else:
            raise TypeError(f"metric {name!r} is not a number: {value!r}")
    return out


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """``git rev-parse HEAD`` (in a DVC temp copy that is the experiment's baseline), else
    ``$DVC_EXP_BASELINE_REV``, else ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DVC_EXP_BASELINE_REV") or "unknown"


def run_name(stage: str, variant: str | None = None, fold: int | None = None, shots: Any = None) -> str:
    """``train/simpropnet/fold0``, ``evaluate/canet/fold2/5shot``, ``report``."""
    parts = [stage]
    if variant is not None:
        parts.append(str(variant))
    if fold is not None:
        parts.append(f"fold{fold}")
    if shots is not None:
        parts.append(f"{_join(shots)}shot")
    return "/".join(parts)


def _join(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def stage_tags(
    stage: str,
    params: "Params",
    *,
    variant: str | None = None,
    fold: int | None = None,
    shots: Any = None,
    extra_tags: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The tags of the tracking contract.  ``variant/fold/shots`` not given -> ``"all"``."""
    commit = git_commit()
    tags = {
        "stage": stage,
        "variant": "all" if variant is None else str(variant),
        "fold": "all" if fold is None else str(fold),
        "shots": "all" if shots is None else _join(shots),
        "protocol": params.splits.protocol,
        "seeds": f"test={_join(params.episodes.test_seeds)};train={params.train.seed}",
        "test_seeds": _join(params.episodes.test_seeds),
        "train_seed": str(params.train.seed),
        "episodes": str(params.episodes.num_episodes),
        "eval_resolution": params.evaluate.resolution,
        "eval_void": params.evaluate.void,
        "class_sampling": params.episodes.class_sampling,
        "small_object_filter": params.splits.small_object_filter,
        "eval_image_size": str(params.evaluate.image_size),
        "setup": params.setup,
        "data_source": params.data.source,
        "git_commit": commit,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME") or "workspace",
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        "mlflow.source.git.commit": commit,
    }
    for key, value in (extra_tags or {}).items():
        tags[sanitize_key(key)] = _join(value)
    return {k: v[:_MAX_TAG_VALUE] for k, v in tags.items()}


# --------------------------------------------------------------------------- runs


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's UI then opens the runs table
STORE_LOCK_TIMEOUT_S = 600.0


class TrackingError(RuntimeError):
    """The MLflow store cannot be opened or used; the message names it and what to do."""


class StageTerminated(BaseException):
    """SIGTERM arrived while a stage run was open (raised so the run is closed as KILLED)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    if not rest or rest.startswith(":memory:"):
        return None
    return Path(rest)


@contextlib.contextmanager
def store_lock(uri: str, timeout: float = STORE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive ``flock`` on ``<db>.lock`` beside a sqlite store (no-op for other stores).

    Held while a process creates or migrates the store and gets or creates its experiment, so
    parallel stages (``dvc queue start --jobs N``) never race MLflow's schema migration.  The
    lock is released when the process dies, so a killed holder never blocks the others.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    with open(lock, "a+b") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"{lock}: another process has held the MLflow store lock for {timeout:.0f} s; "
                        "is a stage hanging? Stop it, or delete the lock file if no stage runs"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def open_store(uri: str, experiment: str, artifact_location: str | None) -> tuple["MlflowClient", str]:
    """``(client, experiment id)``: the store created or migrated once, safely, under
    :func:`store_lock`, and experiment ``experiment`` there (see :func:`get_or_create_experiment`)."""
    mlflow = _mlflow()
    db = sqlite_path(uri)
    with store_lock(uri):
        try:
            client = mlflow.MlflowClient(tracking_uri=uri)
            experiment_id = get_or_create_experiment(client, experiment, artifact_location)
        except Exception as exc:  # noqa: BLE001 - a broken store is one clear error, not a traceback
            where = db if db is not None else uri
            raise TrackingError(
                f"cannot open the MLflow store {where} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
                + (f"If it was damaged (e.g. by parallel runs of an older simprop), move {db} aside: the "
                   "next stage creates a fresh store." if db is not None else "Check tracking.tracking_uri / MLFLOW_TRACKING_URI.")
            ) from exc  # fmt: skip
    return client, experiment_id


def get_or_create_experiment(client: "MlflowClient", name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``; created with ``artifact_location`` and the
    ``mlflow.experimentKind=custom_model_development`` tag when missing (the tag is added to an
    existing experiment that lacks it), restored when deleted.  Safe against a parallel creator
    (a ``dvc queue`` worker beside us, e.g. on a tracking server)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


# --------------------------------------------------------------------------- dangling runs


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
    """Count a :class:`StageRun` method's time as MLflow logging (:mod:`simprop.timing`)."""

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

        items = [RunTag(sanitize_key(k), _join(v)[:_MAX_TAG_VALUE]) for k, v in tags.items()]
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
    from simprop.params import dump_yaml

    root = find_repo_root(repo_root)
    uri, artifacts = resolve_tracking(repo_root, params.tracking.tracking_uri, params.tracking.experiment)
    _mlflow()
    with _terminate_as_exception():
        with span("mlflow_setup"), _mlflow_write(held="keep"):
            client, experiment_id = open_store(uri, params.tracking.experiment, artifacts)
            name = run_name(stage, variant, fold, shots)
            key = stage_key(name, root)
            tags = stage_tags(stage, params, variant=variant, fold=fold, shots=shots, extra_tags=extra_tags)
            tags.update({"stage_key": key[:_MAX_TAG_VALUE], "process": process_token()})
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
                client.set_tag(info.run_id, "error", f"{type(exc).__name__}: {exc}"[:_MAX_TAG_VALUE])
            with contextlib.suppress(Exception), _mlflow_write(held="drop"):
                client.set_terminated(info.run_id, status=status)
            raise
        with span("mlflow_close"), _mlflow_write():
            client.set_terminated(run.run_id, status="FINISHED")
