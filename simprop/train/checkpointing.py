"""Checkpoint and resume of a training: what ``last.pt`` must share with the current run to be
resumed (:func:`run_fingerprint`), and reading / writing the training state.

``last.pt`` is written atomically after every epoch with the optimiser state and history; all
randomness of epoch ``e`` is derived from ``(train.seed, e)``, so a resumed run continues
exactly where a killed one stopped.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from simprop.infra.atomic import write_json
from simprop.layout import RunLayout
from simprop.model import save_checkpoint
from simprop.model.checkpoint import (
    CheckpointIdentity,
    CorruptCheckpointError,
    load_training_state,
    save_training_state,
)
from simprop.params import Params


def run_fingerprint(params: Params, variant: str, fold: int, inputs: dict[str, str] | None = None) -> str:
    """What a checkpoint must share with the current run to be resumed.

    Everything that shapes training except ``train.epochs`` (raising the epoch
    count continues a finished run), the device, the process count (N DDP
    processes see the same batches as one) and how many folds train side by
    side, plus ``inputs``: digests of what the params do not pin down (the
    frozen backbone's weights, the fold's training list and validation
    episodes, the training code), so that a rebuilt backbone, regenerated data
    or changed code never resumes a stale checkpoint.
    """
    train = params.to_dict()["train"]
    # this replicate's seed, not the list: adding a seed to train.seeds resumes the others
    train.pop("seeds")
    train["seed"] = params.train.seed
    # raising the epoch count continues a constant-lr run; a poly schedule depends on it
    for key in ("device", "processes", "parallel_folds", "variants", "folds") + (("epochs",) if params.train.lr_schedule == "constant" else ()):
        train.pop(key)
    relevant = {
        "variant": variant,
        "fold": fold,
        "train": train,
        "model": params.to_dict()["model"],
        "data": params.to_dict()["data"],
        "splits": params.to_dict()["splits"],
        "episodes": params.to_dict()["episodes"],
        "inputs": inputs or {},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# The code that shapes a training (the train stage's code deps in dvc.yaml): when DVC reruns
# the stage because one of them changed, the old last.pt must not be resumed.
# Paths relative to simprop/; a folder stands for all its *.py.
TRAINING_CODE = ("train", "engine", "model", "data/datasets.py", "infra/distributed.py", "infra/device.py")


def training_code_digest() -> str:
    """sha256 over the source files in :data:`TRAINING_CODE` (a package: all its ``*.py``)."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for name in TRAINING_CODE:
        path = package / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(file.relative_to(package).as_posix().encode())
            h.update(file.read_bytes())
    return h.hexdigest()


@dataclass
class TrainingCheckpoints:
    """``best.pt`` and ``last.pt`` of one (variant, fold) training and what they must match.

    ``identity``: what the checkpoints record they were trained as (checked by every loader);
    ``fingerprint``: what a ``last.pt`` must share with this run to be resumed
    (:func:`run_fingerprint`).
    """

    paths: RunLayout
    identity: CheckpointIdentity
    fingerprint: str
    epochs: int

    def resume(self, model, optimizer, iom, tracker=None) -> tuple[int, dict]:
        """The next epoch to run and the history so far (fresh start if nothing matches), with
        ``model``, ``optimizer`` and ``iom`` loaded from ``last.pt`` when it continues this run.

        ``last.pt`` is read by :func:`simprop.model.checkpoint.load_training_state` (weights only,
        never arbitrary pickled objects): an unsafe file (a plain pickle included) or one of
        another variant or fold stops the stage with a clear error; a truncated or damaged one is
        moved aside to ``last.pt.corrupt[.N]`` with a warning naming it, and training starts from
        scratch; an older format or another training fingerprint (params, data, backbone or code
        changed) starts from scratch.
        """
        fresh = {"loss": [], "val": [], "best_val_miou": -1.0, "best_epoch": -1, "resumed_from": None}
        last, variant, fold = self.paths.last, self.paths.variant, self.paths.fold
        if not last.is_file():
            return 0, fresh
        try:
            state = load_training_state(last, CheckpointIdentity(variant=variant, fold=fold, train_seed=self.paths.seed))
        except CorruptCheckpointError as exc:  # truncated or damaged (the atomic replace never tears it):
            aside = _move_aside(last)  # kept for inspection, never silently replaced
            print(f"warning: {exc}; moved it to {aside} and starting {variant} fold {fold} from scratch",
                  file=sys.stderr, flush=True)  # fmt: skip
            return 0, fresh
        if state is None:
            print(f"{last} is not a training state of this simprop version; starting from scratch")
            return 0, fresh
        if state.get("fingerprint") != self.fingerprint:
            print(f"{last} was trained with other params, data, backbone or code; starting from scratch")
            return 0, fresh
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith("backbone.") for k in missing):
            print(f"{last} does not fit this network; starting from scratch")
            return 0, fresh
        optimizer.load_state_dict(state["optimizer"])
        if iom is not None and state.get("iom_history") is not None:
            iom.load_state_dict(state["iom_history"])
        history = state["history"]
        history["loss"] = [tuple(r) for r in history["loss"]]
        history["val"] = [tuple(r) for r in history["val"]]
        history["resumed_from"] = state["epoch"] + 2  # 1-based number of the first epoch run now
        print(f"resuming {variant} fold {fold} after completed epoch {state['epoch'] + 1}")
        if tracker is not None:  # link the MLflow run to the run whose last.pt it continues
            tracker.set_tags({
                "resumed_from_run": state.get("run_id") or "unknown",
                "resumed_from_epoch": history["resumed_from"],
            })  # fmt: skip
        return state["epoch"] + 1, history

    def save_last(self, epoch: int, history: dict, model, optimizer, iom, run_id: str | None) -> None:
        """``last.pt`` after completed ``epoch`` (0-based), and ``state.json`` beside it."""
        save_training_state(
            self.paths.last, identity=self.identity, fingerprint=self.fingerprint, epoch=epoch,
            model_state=model.trainable_state_dict(), optimizer_state=optimizer.state_dict(),
            history=history, run_id=run_id, iom_history=iom.state_dict() if iom is not None else None,
        )  # fmt: skip
        state = {
            "variant": self.paths.variant,
            "fold": self.paths.fold,
            "completed_epochs": epoch + 1,
            "epochs": self.epochs,
            "fingerprint": self.fingerprint,
            "resumed_from": history.get("resumed_from"),
        }
        write_json(self.paths.state, state)

    def save_best(self, model, epoch: int, val_miou: float, image_size: int) -> None:
        """``best.pt``: the network of the best validation mIoU so far."""
        save_checkpoint(
            self.paths.best, model, identity=self.identity, epoch=epoch, val_miou=val_miou,
            image_size=image_size, fold=self.paths.fold, fingerprint=self.fingerprint,
        )  # fmt: skip


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.corrupt`` (``.corrupt.1``, ... when taken) and return the new path."""
    aside = path.with_name(path.name + ".corrupt")
    n = 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt.{n}")
    path.rename(aside)
    return aside
