"""The MLflow store: where runs go, and opening it safely from parallel stages.

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

"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from simprop.errors import TrackingError
from simprop.infra.timing import span

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient


_EXPS_PARTS = (".dvc", "tmp", "exps")


# MLflow's client retries an unanswered HTTP call 7 times with doubling waits (minutes in all)
# before it fails; a stage keeps what a tracking server does not take and sends it later
# (run.StageRun.keep), so two quick retries are enough and the work is not held up.  An
# environment variable of the caller's wins.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _mlflow():
    """Import mlflow on first use, with telemetry off and the HTTP retries above unless the
    caller chose otherwise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    with span("mlflow_import"):
        import mlflow

    return mlflow


# ---------------------------------------------------------------------------- locations


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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's UI then opens the runs table
STORE_LOCK_TIMEOUT_S = 600.0


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


def check_server(uri: str, timeout: float) -> None:
    """A tracking server (``http(s)://`` URI) must answer within ``timeout`` seconds, or the stage
    stops before any work with one line naming the URI.  Without this check MLflow's client
    retries a refused connection with backoff for minutes (253 s measured) before it fails.
    Any HTTP answer counts (an authenticating proxy may answer 401): only no answer fails."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"tracking URI {uri}: no MLflow server answers within {timeout:g} s ({reason}); start it "
            "(mlflow server --host <host> --port <port> ...), fix tracking.tracking_uri / "
            "MLFLOW_TRACKING_URI, or set tracking.tracking_uri: \"\" and unset MLFLOW_TRACKING_URI for "
            "the local sqlite store (tracking.connect_timeout_s sets the wait)"
        ) from None


def open_store(uri: str, experiment: str, artifact_location: str | None,
               connect_timeout_s: float = 5.0) -> tuple["MlflowClient", str]:  # fmt: skip
    """``(client, experiment id)``: the store created or migrated once, safely, under
    :func:`store_lock`, and experiment ``experiment`` there (see :func:`get_or_create_experiment`).
    A tracking server is asked first, ``connect_timeout_s`` at most (:func:`check_server`)."""
    check_server(uri, connect_timeout_s)
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


