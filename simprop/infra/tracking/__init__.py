"""MLflow tracking: one run per stage execution (docs/architecture.md, "Tracking contract").

* :mod:`.store` where runs go (params, ``MLFLOW_TRACKING_URI`` or the repo's sqlite file) and
  opening the store safely from parallel stages;
* :mod:`.tags`  run names, the tags every stage run carries, params and metrics as MLflow keeps them;
* :mod:`.run`   :func:`stage_run`: one run per stage execution, kept whole through a server outage;
* :mod:`.signals` Ctrl-C and SIGTERM close the run KILLED; :mod:`.dangling` closes runs of killed processes.

Runs are written through an explicit :class:`mlflow.MlflowClient`; this package sets no global
MLflow state (no ``mlflow.set_tracking_uri``, no fluent active run).  ``mlflow`` is imported on
first use, so importing this package is cheap, and ``MLFLOW_DISABLE_TELEMETRY`` defaults to
``true`` when it is.
"""

from simprop.infra.tracking.run import StageRun, stage_run
from simprop.infra.tracking.store import (
    find_repo_root,
    original_repo_root,
    resolve_tracking,
)
from simprop.infra.tracking.tags import (
    flatten_metrics,
    run_name,
    sanitize_key,
    stage_tags,
)

__all__ = [
    "StageRun", "find_repo_root", "flatten_metrics", "original_repo_root", "resolve_tracking", "run_name",
    "sanitize_key", "stage_run", "stage_tags",
]
