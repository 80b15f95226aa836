"""Checkpoints: trainable weights + backbone spec and checksum, written atomically.

The frozen backbone is not stored (it is rebuilt from ``model.backbone_weights`` /
``model.backbone_seed``); a sha256 of its tensors guards against rebuilding a different
one (another ImageNet file, another torchvision init).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from simprop.params import ModelParams

FORMAT = "simprop-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another variant or of another backbone."""


def save_checkpoint(path: str | os.PathLike, model, **meta: Any) -> Path:
    """Write ``model``'s trainable weights and ``meta`` (epoch, optimizer state, val mIoU, ...)
    to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": model.variant,
        "model_params": dataclasses.asdict(model.params),
        "state_dict": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
        "backbone": {
            "backbone_weights": model.params.backbone_weights,
            "backbone_seed": model.params.backbone_seed,
            "sha256": model.backbone.checksum(),
        },
        "meta": _plain(meta),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    variant: str | None = None,
    *,
    expected_variant: str | None = None,
    params: ModelParams | None = None,
):
    """Rebuild the model stored in ``path`` -> ``(model, meta)``; the model is in eval mode.

    ``variant`` (alias ``expected_variant``) makes a checkpoint of another variant an error.
    ``params`` overrides the stored ``ModelParams`` (e.g. to point ``backbone_weights`` at the
    file's new location); the backbone checksum is still verified.
    """
    from simprop.model.network import build_model  # late: network imports this package

    path = Path(path)
    expected = variant or expected_variant
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train the model first (dvc repro train) or fix the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}); delete it "
            f"and re-run training (a killed run resumes from last.pt)"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a simprop checkpoint (no '{FORMAT}' marker); was it written by save_checkpoint?")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('format_version')} is not {FORMAT_VERSION}; re-train")
    stored_variant = payload["variant"]
    if expected is not None and stored_variant != expected:
        raise CheckpointError(f"{path} holds a {stored_variant!r} model, expected {expected!r}; check the path or the variant")
    if params is None:
        try:
            params = ModelParams(**payload["model_params"])
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
    return model, payload.get("meta", {})


def _plain(value: Any) -> Any:
    """Meta as plain containers, so it loads with ``weights_only=True`` (numpy scalars, Paths)."""
    if isinstance(value, dict):
        return {str(k) if isinstance(k, os.PathLike) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    if type(value).__module__ == "numpy":  # arrays
        return torch.as_tensor(value)
    return value
