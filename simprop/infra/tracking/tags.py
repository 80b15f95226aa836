"""Names and values of MLflow runs: run names, the tags every stage run carries, and
params/metrics flattened and clipped to what MLflow stores."""

from __future__ import annotations

import json
import numbers
import os
import re
import subprocess
from typing import Any, Mapping

from simprop.infra.machine import machine_tags
from simprop.params import Params

_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000


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


def run_name(stage: str, variant: str | None = None, fold: int | None = None, shots: Any = None,
             seed: int | None = None) -> str:  # fmt: skip
    """``train/simpropnet/fold0/seed1``, ``evaluate/canet/fold2/seed0/1,5shot``, ``report``."""
    parts = [stage]
    if variant is not None:
        parts.append(str(variant))
    if fold is not None:
        parts.append(f"fold{fold}")
    if seed is not None:
        parts.append(f"seed{seed}")
    if shots is not None:
        parts.append(f"{_join(shots)}shot")
    return "/".join(parts)


def _join(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


EXECUTOR_ENV = "SIMPROP_EXECUTOR"
"""Set to ``slurm`` by :mod:`simprop.infra.slurm` in each SLURM job; unset (``local``) elsewhere."""


def executor_tags() -> dict[str, str]:
    """Where this run's job ran: ``executor`` (local / slurm), ``host`` and, inside a SLURM job,
    ``slurm_job_id`` (``<array job>_<task>`` for an array task, as ``squeue`` and submitit name it)."""
    import socket

    tags = {"executor": os.environ.get(EXECUTOR_ENV) or "local", "host": socket.gethostname()}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    if job:
        tags["slurm_job_id"] = job
    return tags


def stage_tags(stage: str, params: "Params", *, variant: str | None = None, fold: int | None = None, shots: Any = None,
               seed: int | None = None, extra_tags: Mapping[str, Any] | None = None) -> dict[str, str]:  # fmt: skip
    """The tags of the tracking contract.  ``variant/fold/shots`` not given -> ``"all"``; ``seed``
    (one training replicate) not given -> ``train_seed`` lists ``train.seeds``.  The replicates of a
    (variant, fold) share the tag ``replicate_group`` (``train/simpropnet/fold0``): search
    ``tags.replicate_group = '...'`` in the UI to see them together."""
    commit = git_commit()
    train_seed = str(seed) if seed is not None else _join(params.train.seeds)
    tags = {
        "stage": stage,
        "variant": "all" if variant is None else str(variant),
        "fold": "all" if fold is None else str(fold),
        "shots": "all" if shots is None else _join(shots),
        "protocol": params.splits.protocol,
        "seeds": f"test={_join(params.episodes.test_seeds)};train={train_seed}",
        "test_seeds": _join(params.episodes.test_seeds),
        "train_seed": train_seed,
        "train_seeds": _join(params.train.seeds),
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
        **executor_tags(),
    }
    if seed is not None and variant is not None and fold is not None:
        tags["replicate_group"] = f"{stage}/{variant}/fold{fold}"
    tags.update(machine_tags())  # machine.cpu_model, machine.torch, ...: what the run ran on (simprop/infra/machine.py)
    for key, value in (extra_tags or {}).items():
        tags[sanitize_key(key)] = _join(value)
    return {k: v[:MAX_TAG_VALUE] for k, v in tags.items()}


