"""Checkpoints: trainable weights + backbone spec and checksum + training identity, written atomically.

This module is the one place where checkpoints are read (``best.pt`` by evaluate, the analyses
and ``simprop segment``; ``last.pt`` by a resumed training) and so the one place where they are
checked:

* **Safe loading.** Every file is read with ``torch.load(..., weights_only=True)``: only tensors
  and plain containers (dict, list, tuple, str, int, float, bool, None) are unpickled, never an
  arbitrary object, so a crafted file (``models/`` travels through DVC caches and remotes) cannot
  run code.  A file that holds anything else is refused with :class:`UnsafeCheckpointError`.
* **Identity.** A checkpoint written by training records what it was trained as
  (:class:`CheckpointIdentity`): variant, fold, protocol, the sha256 of the frozen backbone and
  of the fold's split lists.  A caller states what it expects (``expected=``) and any difference
  is a :class:`CheckpointError` naming the file, what it holds and what was expected - a fold-1
  model copied over ``models/canet/fold0/seed0/best.pt`` was trained on fold 0's test classes and must
  never be scored as fold 0.
* **Backbone.** The frozen backbone is not stored (it is rebuilt from ``model.backbone_weights`` /
  ``model.backbone_seed``); a sha256 of its tensors guards against rebuilding a different one
  (another ImageNet file, another torchvision init).

What "expected" means for each caller (docs/reliability.md):

* evaluate and the analyses: variant and fold from the stage, protocol from ``splits.protocol``,
  the backbone the current ``model`` params build, and the digest of the fold's split lists
  (``splits/fold<i>/{train,val}.csv``, what training read) - all cheap to recompute from the
  stage's own inputs.  The training fingerprint's digest of the training *code* is deliberately
  not part of it: evaluating a checkpoint after a code refactor is legitimate, and DVC already
  reruns training when the training code changes.
* ``simprop segment``: the variant (``--variant``) and fold (``--fold``) when given; it prints
  the fold's held-out (test) classes.
* resume (``last.pt``): variant and fold must match (another is a misplaced file: an error);
  a different training fingerprint (params, data, backbone or code changed) starts training
  from scratch, as a rerun by DVC should.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from simprop.errors import CheckpointError
from simprop.infra.atomic import disk_full_error, is_disk_full, size_of
from simprop.model.encoder import build_backbone
from simprop.model.network import build_model
from simprop.params import ModelParams
from simprop.voc import class_name, fold_classes

FORMAT = "simprop-checkpoint"
STATE_FORMAT = "simprop-training-state"
FORMAT_VERSION = 2


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled objects other than tensors and plain containers."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated or not a torch file at all."""


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a checkpoint was trained as; as an expectation, ``None`` fields are not checked.

    ``splits_sha256`` is :func:`splits_digest` of the fold's split lists, ``backbone_sha256``
    the frozen backbone's :meth:`checksum`.
    """

    variant: str | None = None
    fold: int | None = None
    protocol: str | None = None
    backbone_sha256: str | None = None
    splits_sha256: str | None = None
    train_seed: int | None = None  # the training replicate (train.seeds); None in older checkpoints

    def describe(self) -> str:
        """``a 'canet' model of fold 1 (protocol oslsm, backbone sha256 1a2b3c4d5e6f, fold lists sha256 9f8e7d6c5b4a)``."""
        head = f"a {self.variant!r} model" if self.variant is not None else "a model"
        if self.fold is not None:
            head += f" of fold {self.fold}"
        if self.train_seed is not None:
            head += f", training seed {self.train_seed}"
        extra = [
            f"{label} {value[:12] if label.endswith('sha256') else value}"
            for label, value in (
                ("protocol", self.protocol),
                ("backbone sha256", self.backbone_sha256),
                ("fold lists sha256", self.splits_sha256),
            )
            if value is not None
        ]
        return head + (f" ({', '.join(extra)})" if extra else "")

    def differences(self, expected: "CheckpointIdentity") -> list[str]:
        """The fields where ``expected`` (non-``None``) differs from this identity, as phrases."""
        labels = {
            "variant": "variant", "fold": "fold", "protocol": "protocol",
            "backbone_sha256": "frozen backbone", "splits_sha256": "fold's split lists",
            "train_seed": "training seed",
        }  # fmt: skip
        out = []
        for name, label in labels.items():
            want, have = getattr(expected, name), getattr(self, name)
            if want is not None and want != have:
                short = (lambda v: v[:12] if isinstance(v, str) and name.endswith("sha256") else v)
                out.append(f"{label} {short(have)!r} != expected {short(want)!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> "CheckpointIdentity | None":
        if not isinstance(raw, Mapping):
            return None
        return cls(**{f.name: raw.get(f.name) for f in dataclasses.fields(cls)})


def held_out_classes(fold: int) -> list[str]:
    """``["1 aeroplane", ...]``: the fold's test classes, which its training never saw."""

    return [f"{c} {class_name(c)}" for c in fold_classes(fold)]


def splits_digest(data_root: str | os.PathLike, fold: int) -> str:
    """sha256 over the fold's ``splits/fold<i>/train.csv`` and ``val.csv`` (what training read).

    Raises :class:`CheckpointError` naming the missing list (run the splits stage first).
    """
    h = hashlib.sha256()
    for name in ("train", "val"):
        path = Path(data_root) / "splits" / f"fold{fold}" / f"{name}.csv"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(
                f"{path}: cannot read the fold's split list to check the checkpoint's identity "
                f"({exc.strerror or exc}); run `dvc repro splits` first"
            ) from None
        h.update(f"{name}.csv:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def expected_identity(params, variant: str, fold: int, root: str | os.PathLike = ".",
                      backbone_sha256: str | None = None) -> CheckpointIdentity:  # fmt: skip
    """What a stage that scores ``variant`` on ``fold`` with ``params`` expects a checkpoint to be.

    ``backbone_sha256``: the checksum of the backbone the current ``model`` params build, when the
    caller has built one already (else it is built here from ``model.backbone_weights``/``seed``).
    """
    if backbone_sha256 is None:

        backbone_sha256 = build_backbone(params.model.backbone_weights, params.model.backbone_seed).checksum()
    return CheckpointIdentity(
        variant=variant,
        fold=int(fold),
        protocol=params.splits.protocol,
        backbone_sha256=backbone_sha256,
        splits_sha256=splits_digest(Path(root) / params.data.root, fold),
        train_seed=int(params.train.seed),
    )


# --------------------------------------------------------------------------- writing


def _atomic_save(payload: Any, path: Path) -> Path:
    """``torch.save`` into a temporary file in the same folder, fsync, then ``os.replace``:
    a kill at any moment leaves the old file or the new one, never a torn one, and never writes
    through a DVC cache hard link."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = size_of(tmp)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, Exception) and is_disk_full(path, exc):  # torch's "unexpected pos" too
            raise disk_full_error(path, written) from None
        raise
    return path


def save_checkpoint(path: str | os.PathLike, model, *, identity: CheckpointIdentity | None = None, **meta: Any) -> Path:
    """Write ``model``'s trainable weights, its ``identity`` (what it was trained as) and ``meta``
    (epoch, val mIoU, image size, ...) to ``path`` atomically."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": model.variant,
        "identity": identity.to_dict() if identity is not None else None,
        "model_params": dataclasses.asdict(model.params),
        "state_dict": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
        "backbone": {
            "backbone_weights": model.params.backbone_weights,
            "backbone_seed": model.params.backbone_seed,
            "sha256": model.backbone.checksum(),
        },
        "meta": _plain(meta),
    }
    return _atomic_save(payload, Path(path))


def save_training_state(path: str | os.PathLike, *, identity: CheckpointIdentity, fingerprint: str, epoch: int,
                        model_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any],
                        history: Mapping[str, Any], run_id: str | None = None, **extra: Any) -> Path:  # fmt: skip
    """Write a resumable training state (``last.pt``) of tensors and plain containers only.

    ``run_id``: the MLflow run that wrote it, so a resumed run can name the run it continues.
    ``extra``: more state to resume (e.g. ``iom_history={"table": tensor, "seen": tensor}``),
    stored under its own key; tensors and plain containers only, like everything else here.
    """
    payload = {
        "format": STATE_FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": identity.to_dict(),
        "fingerprint": fingerprint,
        "epoch": int(epoch),
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "optimizer": _plain(optimizer_state),
        "history": _plain(history),
        "run_id": run_id,
    }
    for key, value in extra.items():
        if key in payload:
            raise ValueError(f"save_training_state: {key!r} is a reserved key")
        payload[key] = _plain(value)
    return _atomic_save(payload, Path(path))


# --------------------------------------------------------------------------- reading


def _safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with a clear error for an unsafe or corrupt file.

    torch's own message for a refused file advises ``weights_only=False`` ("will likely
    succeed"): advice that runs whatever the file holds.  It is never passed on; the error says
    what was found (the refused global, or a plain Python pickle) and that nothing was run.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train the model first (dvc repro train) or fix the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise CorruptCheckpointError(_corrupt_message(path, exc)) from None
        globals_ = [line.strip() for line in text.splitlines() if "GLOBAL" in line or "global:" in line.lower()]
        if globals_:  # a class or function to import: refused
            what = f"pickled Python objects other than tensors and plain containers ({_refused_name(globals_[0])})"
        elif _is_pickle_stream(path):  # not torch's zip format: a plain pickle (protocol >= 2)
            what = "a plain Python pickle, not a torch checkpoint"
        else:
            raise CorruptCheckpointError(_corrupt_message(path, None)) from None
        raise UnsafeCheckpointError(
            f"{path} is not a safe checkpoint: it holds {what}. Nothing in it was run. simprop never "
            f"writes such a file: it may have been tampered with (e.g. on a shared DVC remote). Delete "
            f"it and re-train (dvc repro)."
        ) from None
    except Exception as exc:
        raise CorruptCheckpointError(_corrupt_message(path, exc)) from exc


def _is_pickle_stream(path: Path) -> bool:
    """Whether the file starts like a pickle of protocol 2 or later (the PROTO opcode, 0x80, and
    a protocol number 2..5), which every Python 3 ``pickle.dump`` writes."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _refused_name(line: str) -> str:
    """``GLOBAL __main__.Evil was not an allowed global...`` -> ``GLOBAL __main__.Evil`` (torch's
    advice on how to allow it is dropped)."""
    words = line.replace("Unsupported global:", "").split()
    if "GLOBAL" in words and words.index("GLOBAL") + 1 < len(words):
        return "GLOBAL " + words[words.index("GLOBAL") + 1]
    return line.split(" was not ")[0][:200]


def _corrupt_message(path: Path, exc: BaseException | None) -> str:
    detail = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc is not None else ""
    return f"checkpoint {path} is corrupt or truncated{detail}; delete it and re-run training (a killed run resumes from last.pt)"


def _check_identity(path: Path, stored: CheckpointIdentity | None, expected: CheckpointIdentity | None) -> None:
    if expected is None:
        return
    checked = {f.name for f in dataclasses.fields(expected) if getattr(expected, f.name) is not None}
    if not checked:
        return
    if stored is None or any(getattr(stored, name) is None for name in checked):
        raise CheckpointError(
            f"{path} records no training identity ({', '.join(sorted(checked))}), so it cannot be "
            f"checked against what is expected: {expected.describe()}. It was not written by the "
            f"train stage of this version; re-train it (dvc repro)"
        )
    differences = stored.differences(expected)
    if not differences:
        return
    advice = ""
    if expected.fold is not None and stored.fold is not None and stored.fold != expected.fold:
        advice = (
            f" A fold-{stored.fold} model was trained on fold {expected.fold}'s test classes "
            f"({', '.join(held_out_classes(expected.fold))}), so its scores there would be meaningless."
        )
    stage = (
        f" (dvc repro train, or python3 stages/train.py --variant {expected.variant} --fold {expected.fold})"
        if expected.variant is not None and expected.fold is not None else ""
    )  # fmt: skip
    raise CheckpointError(
        f"{path} holds {stored.describe()}, expected {expected.describe()}: {'; '.join(differences)}.{advice} "
        f"Re-train it{stage} or fix the path."
    )


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    variant: str | None = None,
    *,
    expected_variant: str | None = None,
    expected: CheckpointIdentity | None = None,
    params: ModelParams | None = None,
):
    """Rebuild the model stored in ``path`` -> ``(model, meta)``; the model is in eval mode.

    ``expected``: what the caller expects (:class:`CheckpointIdentity`; ``None`` fields are not
    checked, e.g. :func:`expected_identity` for a stage); ``variant`` (alias ``expected_variant``)
    is a shorthand for ``expected=CheckpointIdentity(variant=...)``.  Any difference is a
    :class:`CheckpointError` naming the file, what it holds and what was expected.  ``params``
    overrides the stored ``ModelParams`` (e.g. to point ``backbone_weights`` at the file's new
    location); the backbone checksum is still verified.  ``meta["identity"]`` is the stored
    :class:`CheckpointIdentity` as a dict (``None`` for a checkpoint written without one).
    """

    path = Path(path)
    wanted = variant or expected_variant
    if wanted is not None:
        expected = dataclasses.replace(expected or CheckpointIdentity(), variant=wanted)
    payload = _safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = " (it is a training state: use best.pt)" if isinstance(payload, dict) and payload.get("format") == STATE_FORMAT else ""
        raise CheckpointError(f"{path} is not a simprop checkpoint (no '{FORMAT}' marker){hint}; was it written by save_checkpoint?")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('format_version')} is not {FORMAT_VERSION} "
            f"(written by another simprop version); re-train"
        )
    stored_variant = payload["variant"]
    stored = CheckpointIdentity.from_dict(payload.get("identity"))
    if stored is None:
        stored_for_check = CheckpointIdentity(variant=stored_variant)
    else:
        stored_for_check = stored
    _check_identity(path, stored_for_check, expected)
    if params is None:
        try:
            # model.conv_kernel is newer than some checkpoints: those ran the encoder conv as the
            # shifted GEMM on the CPU in float32 (and conv2d elsewhere), which "shifted_gemm" pins
            params = ModelParams(**{"conv_kernel": "shifted_gemm", **payload["model_params"]})
        except TypeError as exc:
            raise CheckpointError(f"{path}: stored model params do not match ModelParams ({exc}); re-train") from exc
    model = build_model(stored_variant, params)
    checksum = model.backbone.checksum()
    if checksum != payload["backbone"]["sha256"]:
        raise CheckpointError(
            f"{path}: the backbone rebuilt from backbone_weights={params.backbone_weights!r} "
            f"(seed {params.backbone_seed}) differs from the one the checkpoint was trained with "
            f"(sha256 {checksum[:12]} != {payload['backbone']['sha256'][:12]}); provide the same "
            f"backbone weights file (model.backbone_weights) or re-train"
        )
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the {stored_variant!r} network (missing {missing[:5]}, unexpected {unexpected[:5]}); re-train")
    model.to(map_location).eval()
    meta = dict(payload.get("meta") or {})
    meta["identity"] = stored.to_dict() if stored is not None else None
    return model, meta


def load_training_state(path: str | os.PathLike, expected: CheckpointIdentity) -> dict | None:
    """The resumable state in ``path`` (``last.pt``), checked against ``expected``.

    Returns ``None`` when the file is not a training state of this version (written by an older
    simprop, or a stray file): training then starts from scratch.  Raises
    :class:`UnsafeCheckpointError` for a file holding arbitrary pickled objects (never loaded,
    never silently overwritten), :class:`CorruptCheckpointError` for a truncated file and
    :class:`CheckpointError` for one of another variant or fold (a misplaced file), naming it.
    """
    path = Path(path)
    state = _safe_load(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("format_version") != FORMAT_VERSION:
        return None
    stored = CheckpointIdentity.from_dict(state.get("identity"))
    _check_identity(path, stored, expected)
    return state


def _plain(value: Any) -> Any:
    """Meta as plain containers, so it loads with ``weights_only=True`` (numpy scalars, Paths)."""
    if isinstance(value, dict):
        return {str(k) if isinstance(k, os.PathLike) else _plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "item") and type(value).__module__ == "numpy" and getattr(value, "ndim", 0) == 0:
        return value.item()
    if type(value).__module__ == "numpy":  # arrays
        return torch.as_tensor(value)
    return value
