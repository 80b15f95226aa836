"""The model registry: every evaluated checkpoint as a registered MLflow model, and fetching one back.

What is registered
------------------
The evaluate stage's run of a (variant, fold, seed) logs that replicate's ``best.pt`` as an MLflow
model (:func:`register_checkpoint`) and registers it: one registered model per variant (name
``tracking.registered_model``, default ``simprop-{variant}``), one version per evaluation of a
(fold, seed), tagged ``variant``, ``fold``, ``seed``, ``setup``, ``protocol`` and
``checkpoint_sha256``.  The logged model carries an input example and signature, the fold's
held-out classes, the checkpoint's identity (:class:`simprop.model.CheckpointIdentity`) and its
``ModelParams`` as metadata, and the frozen backbone file when there is one (the checkpoint does
not hold it, and a user of the registry has no pipeline checkout).

The model's form: *models from code*, not the PyTorch flavour
-------------------------------------------------------------
``mlflow.pytorch.log_model`` saves the whole ``nn.Module`` with ``torch.save`` (pickle), and
``mlflow.pytorch.load_model`` unpickles it - code from the registry would run on load.  Its
state-dict mode still needs a pickled module class to rebuild.  simprop's checkpoints are
weights-only and identity-checked (:mod:`simprop.model.checkpoint`); the registered model keeps
exactly that file: a ``mlflow.pyfunc`` model *from code* (the code is the three-line text
:data:`simprop.segment.mlflow_model.MODEL_CODE`; nothing is cloudpickled) with ``best.pt``
as its artifact ``checkpoint`` (``artifacts/best.pt``), loaded by
:class:`~simprop.segment.mlflow_model.Segmenter` through :func:`simprop.model.load_checkpoint`.
``simprop segment --model`` (:func:`fetch_checkpoint`) downloads only ``artifacts/best.pt`` and
loads it with the same loader; MLflow's own loader is never called.

The model is logged the way MLflow 3.17's ``Model.log`` (mlflow/models/model.py) does it -
``create_logged_model``, ``log_outputs`` (the run's output), ``save_model`` into a temporary
folder, ``log_model_artifacts``, ``finalize_logged_model``, ``create_model_version`` - but
through the stage run's explicit client, so no global MLflow state (tracking URI, active run) is
set, and without ``Model.log``'s extra steps: inferring pip requirements (a subprocess that
imports the model: seconds) and validating the serving example (runs the model once).

Aliases
-------
An alias names one version of a registered model and moves when a newer version takes it.

* ``fold<i>-seed<s>`` on every version: each training replicate whose mean the report's
  tables give for (variant, fold i) - the numbers in ``reports/tables.md`` are over exactly the
  versions that hold these aliases after ``dvc repro``.
* ``fold<i>`` on the replicate of the first training seed (``train.seeds[0]``): the one the
  report's qualitative figure shows (simprop/report/figures.py), the default of a fold.

There is no model-wide ``champion``: the folds hold out different classes, so their models are
not rivals, and picking a replicate by its test scores would be model selection on the test set.

When
----
``tracking.register_models``: ``true``, ``false`` or ``auto`` = on for a tracking server
(``http(s)://``), off for the local sqlite store.  Not for time (measured there: 1.6 s for the
first registration of a process, 0.1-0.2 s for the next; docs/scale-out.md) but for disk: every
version holds copies of ``best.pt`` and of the frozen backbone file (34 MB in the default setup)
under ``mlartifacts/``, which one person working alone does not need.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simprop.errors import TrackingError
from simprop.infra.timing import span
from simprop.infra.tracking.store import _mlflow, check_server
from simprop.model.checkpoint import held_out_classes

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities.model_registry import ModelVersion

    from simprop.infra.tracking.run import StageRun
    from simprop.params import Params

CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc artifact's name; stored as artifacts/best.pt
BACKBONE_ARTIFACT = "backbone"  # the frozen backbone's file, when model.backbone_weights is one
MODEL_NAME = "model"  # the logged model's name in the run


def registration_enabled(setting: Any, tracking_uri: str) -> bool:
    """``tracking.register_models``: ``True``/``False``, or ``"auto"`` = a tracking server is used."""
    if setting == "auto":
        return tracking_uri.startswith(("http://", "https://"))
    return bool(setting)


def registered_name(template: str, variant: str) -> str:
    """``simprop-{variant}`` -> ``simprop-canet``."""
    return template.replace("{variant}", variant)


def version_aliases(fold: int, seed: int, first_seed: int) -> list[str]:
    """The aliases a version takes (module docstring, "Aliases")."""
    return [f"fold{fold}-seed{seed}"] + ([f"fold{fold}"] if seed == first_seed else [])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _requirements() -> list[str]:
    """Pinned requirements of the pyfunc model; simprop itself must be installed too (MODEL_CODE
    imports it): it is not on PyPI, so it cannot be listed."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "numpy", "pillow"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # pragma: no cover - installed with simprop
            out.append(name)
    return out


def register_checkpoint(run: StageRun, checkpoint: Path, params: Params, variant: str, fold: int, seed: int,
                        meta: dict, model_params: dict | None = None) -> ModelVersion:  # fmt: skip
    """Log ``checkpoint`` (a ``best.pt``) as the model of the evaluate run ``run`` and register it
    as a new version of ``simprop-<variant>`` with its tags and aliases (module docstring).

    ``meta``: what :func:`simprop.model.load_checkpoint` returned with the model (``identity``,
    ``image_size``, ``epoch``, ``val_miou``).  ``model_params``: the network's ``ModelParams`` as a
    dict; when its ``backbone_weights`` is a file (the backbone stage's ``backbone/resnet50.pt``,
    not ``imagenet`` / ``none``) that file goes into the model too (artifact ``backbone``): the
    checkpoint holds no frozen backbone, and a user of the registry has no pipeline checkout.
    Returns the new model version.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model


    client = run.client
    identity = dict(meta.get("identity") or {})
    sha = file_sha256(checkpoint)
    name = registered_name(params.tracking.registered_model, variant)
    tags = {"variant": variant, "fold": str(fold), "seed": str(seed), "setup": params.setup,
            "protocol": params.splits.protocol, "checkpoint_sha256": sha}  # fmt: skip
    metadata = {
        "simprop_identity": identity,
        "held_out_classes": held_out_classes(fold),
        "checkpoint_sha256": sha,
        "image_size": int(meta["image_size"]),
        "epoch": meta.get("epoch"),
        "val_miou": meta.get("val_miou"),
        "model_params": dict(model_params or {}),
    }
    artifacts = {CHECKPOINT_ARTIFACT: "best.pt"}
    weights = (model_params or {}).get("backbone_weights")
    if weights not in (None, "", "imagenet", "none") and Path(weights).is_file():
        artifacts[BACKBONE_ARTIFACT] = str(Path(weights).resolve())
        metadata["backbone_artifact"] = f"artifacts/{Path(weights).name}"
    logged = client.create_logged_model(run.experiment_id, name=MODEL_NAME, source_run_id=run.run_id,
                                        tags=tags, model_type="simprop-segmenter")  # fmt: skip
    try:
        client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="simprop-model-") as tmp:
            code = Path(tmp) / "simprop_model.py"
            code.write_text(MODEL_CODE)
            staged = Path(tmp) / "best.pt"  # the artifact keeps the name best.pt
            shutil.copyfile(checkpoint, staged)
            local = Path(tmp) / "model"
            mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                 run_id=run.run_id, metadata=metadata, model_id=logged.model_id)  # fmt: skip
            mlflow.pyfunc.save_model(
                path=str(local), python_model=str(code), artifacts={**artifacts, CHECKPOINT_ARTIFACT: str(staged)},
                model_config={"identity": identity, "model_params": metadata["model_params"]}, mlflow_model=mlflow_model,
                signature=signature(), input_example=input_example(),
                pip_requirements=_requirements(),
            )  # fmt: skip
            client.log_model_artifacts(logged.model_id, str(local))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    try:
        client.create_registered_model(name, description=f"simprop {variant} checkpoints, one version per "
                                       "evaluated (fold, training seed); aliases fold<i> and fold<i>-seed<s>")  # fmt: skip
    except MlflowException as exc:  # a parallel fold worker (or an earlier run) made it
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # source: the logged model's storage location, not models:/<model id>: MLflow 3.17's sqlalchemy registry
    # store resolves the latter through a client on the *global* tracking URI (a TODO in
    # mlflow/store/model_registry/sqlalchemy_store.py), which this module never sets
    version = client.create_model_version(name, source=logged.artifact_location, run_id=run.run_id, tags=tags,
                                          model_id=logged.model_id)  # fmt: skip
    for alias in version_aliases(fold, seed, params.train.seeds[0]):
        client.set_registered_model_alias(name, alias, version.version)
    return version


def register_in_run(run: StageRun, checkpoint: Path, params: Params, variant: str, fold: int, seed: int,
                    meta: dict, model_params: dict | None = None) -> ModelVersion | None:  # fmt: skip
    """:func:`register_checkpoint` when ``tracking.register_models`` says so (:func:`registration_enabled`).

    A tracking server that is away (before or during it) holds nothing up: the stage's outputs and
    metrics are complete, so it warns, naming the command that registers the checkpoint later (the
    evaluate stage of that replicate, rerun), and goes on.  Any other failure fails the stage.
    """
    import sys


    if not registration_enabled(params.tracking.register_models, run.tracking_uri):
        return None
    again = f"python3 stages/evaluate.py --variant {variant} --fold {fold} --seed {seed}"
    if run.pending and not run.flush():
        print(f"warning: the MLflow server {run.tracking_uri} is away: {checkpoint} is not registered; "
              f"when it answers again run: {again}", file=sys.stderr, flush=True)  # fmt: skip
        return None
    try:
        with span("mlflow_register"):
            version = register_checkpoint(run, checkpoint, params, variant, fold, seed, meta, model_params)
    except Exception as exc:
        if not run.is_outage(exc):
            raise
        print(f"warning: the MLflow server {run.tracking_uri} went away while registering {checkpoint} "
              f"({str(exc).splitlines()[0][:200]}); when it answers again run: {again}", file=sys.stderr, flush=True)  # fmt: skip
        return None
    name = registered_name(params.tracking.registered_model, variant)
    aliases = ", ".join(f"models:/{name}@{a}" for a in version_aliases(fold, seed, params.train.seeds[0]))
    print(f"registered {checkpoint} as models:/{name}/{version.version} ({aliases})", flush=True)
    return version


# ------------------------------------------------------------------------------ fetching


_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w\-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class RegisteredCheckpoint:
    """A registered version's ``best.pt`` downloaded to ``path``, and what the registry says it is."""

    uri: str
    name: str
    version: str
    path: Path
    identity: dict  # the CheckpointIdentity recorded at registration
    tags: dict
    model_params: dict | None = None  # ModelParams, backbone_weights pointing at the downloaded backbone


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/simprop-canet@fold0`` -> ``("simprop-canet", "fold0", None)``;
    ``models:/simprop-canet/3`` -> ``("simprop-canet", None, "3")``; else :class:`TrackingError`."""
    match = _URI.match(uri)
    if match is None:
        raise TrackingError(
            f"{uri!r} is not a registered model URI; give models:/<name>@<alias> (e.g. models:/simprop-canet@fold0) "
            "or models:/<name>/<version>"
        )
    return match["name"], match["alias"], match["version"]


def fetch_checkpoint(uri: str, tracking_uri: str, dst: Path, connect_timeout_s: float = 10.0) -> RegisteredCheckpoint:
    """Download the ``best.pt`` of registered model version ``uri`` (``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``) from ``tracking_uri`` into folder ``dst``.

    Only the checkpoint file is downloaded (through the server's artifact proxy); its sha256 must
    be the one recorded at registration.  The caller loads it with
    :func:`simprop.model.load_checkpoint` against :attr:`RegisteredCheckpoint.identity`.  Errors
    (:class:`TrackingError`) name the URI and the server: an unreachable server, an unknown name
    (with the names there), an unknown alias or version (with the ones there), a version that is
    not a simprop model.
    """

    name, alias, number = parse_model_uri(uri)
    try:
        check_server(tracking_uri, connect_timeout_s)
    except TrackingError as exc:
        reason = str(exc).split("(", 1)[-1].split(")", 1)[0]
        raise TrackingError(
            f"{uri}: no MLflow server answers at {tracking_uri} within {connect_timeout_s:g} s ({reason}); "
            "start it, or give the right one with --tracking-uri or MLFLOW_TRACKING_URI"
        ) from None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one download: no bar
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"{uri}: cannot ask {tracking_uri} ({str(exc).splitlines()[0][:300]})") from None
        names = sorted(m.name for m in _registered_models(client))
        raise TrackingError(
            f"{uri}: {tracking_uri} has no registered model {name!r}; it has: {', '.join(names) or 'none'} "
            "(the evaluate stage registers simprop-<variant> when tracking.register_models is on)"
        ) from None
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TrackingError(f"{uri}: cannot ask {tracking_uri} ({str(exc).splitlines()[0][:300]})") from None
        aliases = sorted(registered.aliases) if isinstance(registered.aliases, dict) else []
        what = f"no alias {alias!r}" if alias is not None else f"no version {number}"
        raise TrackingError(
            f"{uri}: registered model {name!r} on {tracking_uri} has {what}; its aliases: "
            f"{', '.join(aliases) or 'none'} (models:/{name}@<alias>, or models:/{name}/<version>)"
        ) from None
    tags = dict(version.tags or {})
    source = str(version.source or "")
    if "checkpoint_sha256" not in tags or not source or source.startswith(("models:", "runs:")):
        raise TrackingError(f"{uri}: version {version.version} of {name!r} was not registered by simprop's evaluate "
                            "stage (no checkpoint_sha256 tag, or no logged model as its source); give a simprop model")  # fmt: skip
    dst.mkdir(parents=True, exist_ok=True)
    metadata = _model_metadata(uri, source, tracking_uri, dst)
    identity = metadata.get("simprop_identity") or {}
    model_params = dict(metadata.get("model_params") or {}) or None
    if model_params and metadata.get("backbone_artifact"):
        try:
            model_params["backbone_weights"] = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source.rstrip('/')}/{metadata['backbone_artifact']}", dst_path=str(dst / "backbone"),
                tracking_uri=tracking_uri)  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            raise TrackingError(f"{uri}: cannot download its frozen backbone ({metadata['backbone_artifact']}) from "
                                f"{tracking_uri} ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from None  # fmt: skip
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/artifacts/best.pt",
                                                    dst_path=str(dst), tracking_uri=tracking_uri)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - one clear line, whatever the artifact store says
        raise TrackingError(
            f"{uri}: cannot download its checkpoint ({source}/artifacts/best.pt) from {tracking_uri} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})"
        ) from None
    path = Path(local)
    if file_sha256(path) != tags["checkpoint_sha256"]:
        raise TrackingError(
            f"{uri}: the downloaded checkpoint's sha256 differs from the one recorded when version "
            f"{version.version} was registered: the artifact was changed on the server; register it again "
            "(rerun the evaluate stage)"
        )
    return RegisteredCheckpoint(uri, name, str(version.version), path, identity, tags, model_params)


def _registered_models(client) -> Iterator[Any]:
    """The registered models on the server (at most 100), for an error message's hint."""
    try:
        yield from client.search_registered_models(max_results=100)
    except Exception:  # noqa: BLE001 - the list is a hint in an error message only
        return


def _model_metadata(uri: str, source: str, tracking_uri: str, dst: Path) -> dict:
    """The ``metadata`` of the logged model's MLmodel file (YAML, read with ``safe_load``: nothing
    is unpickled or run)."""
    import mlflow
    import yaml

    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source.rstrip('/')}/MLmodel", dst_path=str(dst / "mlmodel"),
            tracking_uri=tracking_uri,
        )  # fmt: skip
        metadata = yaml.safe_load(Path(local).read_text()).get("metadata")
    except Exception as exc:  # noqa: BLE001 - one clear line
        raise TrackingError(f"{uri}: cannot read the MLmodel file ({source}/MLmodel) from "
                            f"{tracking_uri} ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from None  # fmt: skip
    if not isinstance(metadata, dict) or not isinstance(metadata.get("simprop_identity"), dict):
        raise TrackingError(f"{uri}: {source}/MLmodel records no simprop checkpoint identity in its "
                            "MLmodel metadata; it was not registered by simprop's evaluate stage")  # fmt: skip
    return metadata


# The file MLflow stores as the model ("models from code"); see the module docstring.
MODEL_CODE = '''"""simprop's registered segmentation model (simprop.segment.mlflow_model): needs simprop installed."""
from mlflow.models import set_model

from simprop.segment.mlflow_model import Segmenter

set_model(Segmenter())
'''


def input_example(size: int = 32) -> dict[str, Any]:
    """A small, valid input (one query, one support with a square object): the format, by example."""
    rng = np.random.default_rng(0)
    mask = np.zeros((1, size, size), dtype=np.uint8)
    mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return {
        "query": rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8),
        "support_images": rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8),
        "support_masks": mask,
    }


def signature():
    """Named uint8 tensors of any batch size and image size (see the module docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    u8 = np.dtype(np.uint8)
    return ModelSignature(
        inputs=Schema([
            TensorSpec(u8, (-1, -1, -1, 3), "query"),
            TensorSpec(u8, (-1, -1, -1, 3), "support_images"),
            TensorSpec(u8, (-1, -1, -1), "support_masks"),
        ]),
        outputs=Schema([TensorSpec(u8, (-1, -1, -1), "mask")]),
    )  # fmt: skip
