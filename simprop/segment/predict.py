"""The checkpoint and the prediction of ``simprop segment``: the same inference path as the
evaluate stage (:func:`simprop.engine.inference.foreground_margins` and
:func:`~simprop.engine.inference.upsample_margins`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from simprop.engine.inference import foreground_margins, upsample_margins
from simprop.engine.registry import fetch_checkpoint
from simprop.errors import TrackingError
from simprop.infra.device import autocast, resolve_amp
from simprop.infra.device import resolve_device as pipeline_device
from simprop.infra.tracking.store import resolve_tracking
from simprop.model import CheckpointError, CheckpointIdentity, load_checkpoint
from simprop.model.checkpoint import held_out_classes
from simprop.params import ModelParams
from simprop.segment.inputs import SegmentError, to_tensor


def resolve_device(device: str = "auto"):
    """The pipeline's device rule (:func:`simprop.infra.device.resolve_device`) with segment's errors."""

    try:
        return pipeline_device(device)
    except RuntimeError as exc:  # CUDA asked for but absent; torch's own "not a device" error
        if device.startswith("cuda"):
            raise SegmentError(f"device {device!r} asked for, but no CUDA GPU is available here; use --device cpu") from exc
        raise SegmentError(f"{device!r} is not a device; use auto, cpu, cuda or cuda:N") from exc


def load_model(checkpoint: str | Path, device, variant: str | None = None, fold: int | None = None,
               expected: CheckpointIdentity | None = None, model_params: dict | None = None):  # fmt: skip
    """Load a checkpoint as ``(model in eval mode on device, meta)``; clear errors otherwise.

    ``variant`` / ``fold``: when given, the checkpoint must have been trained as that variant on
    that PASCAL-5i fold (its recorded identity, checked by :func:`simprop.model.load_checkpoint`).
    ``expected``: more of the identity to check (a registered model's, :func:`load_registered_model`);
    ``variant`` / ``fold`` take precedence over its fields.  ``model_params``: ``ModelParams`` to build
    the network with instead of the stored ones (a registered model's, whose backbone file is elsewhere);
    the backbone's checksum is still checked.
    """

    checkpoint = Path(checkpoint)
    expected = dataclasses.replace(expected or CheckpointIdentity(), **{
        k: v for k, v in (("variant", variant), ("fold", fold)) if v is not None})  # fmt: skip
    if not checkpoint.is_file():
        raise SegmentError(
            f"{checkpoint}: checkpoint not found; train one (dvc repro) or give the path to a best.pt"
        )
    try:
        model, meta = load_checkpoint(
            checkpoint, map_location="cpu", expected=expected,
            params=ModelParams(**model_params) if model_params else None,
        )
    except CheckpointError as exc:  # its message names the file and what to do
        raise SegmentError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any other failure to load is one clear error too
        raise SegmentError(
            f"{checkpoint}: cannot load the checkpoint ({type(exc).__name__}: {exc}); give a "
            "models/<variant>/fold<i>/seed<s>/best.pt written by the train stage"
        ) from exc
    if not meta.get("image_size"):
        raise SegmentError(f"{checkpoint}: the checkpoint records no image_size; re-save it with the train stage")
    model.to(device).eval()
    return model, meta


def is_model_uri(checkpoint: str | Path) -> bool:
    """Whether ``--checkpoint`` / ``--model`` names a registered model (``models:/...``), not a file."""
    return isinstance(checkpoint, str) and checkpoint.startswith("models:/")


def load_registered_model(uri: str, tracking_uri: str | None, device, variant: str | None = None,
                          fold: int | None = None) -> tuple[torch.nn.Module, dict, str]:  # fmt: skip
    """``(model, meta, label)`` of registered model version ``uri`` (``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``) on ``tracking_uri`` (else ``MLFLOW_TRACKING_URI``, else the
    repository's sqlite store: :func:`simprop.infra.tracking.resolve_tracking`).

    Its ``best.pt`` alone is downloaded into a temporary folder (removed again), its sha256 checked
    against the one recorded at registration, and it is loaded like a ``--checkpoint`` file
    (:func:`load_model`: weights-only, identity-checked) against the identity recorded at
    registration, and ``variant`` / ``fold`` when given.  MLflow's model loader is never called.
    ``label`` names the version for messages: ``models:/simprop-canet@fold0 (version 3)``.
    """

    resolved, _ = resolve_tracking(tracking_uri=tracking_uri or "")
    with tempfile.TemporaryDirectory(prefix="simprop-registered-") as tmp:
        try:
            registered = fetch_checkpoint(uri, resolved, Path(tmp))
        except TrackingError as exc:
            raise SegmentError(str(exc)) from None
        identity = CheckpointIdentity.from_dict(registered.identity)
        label = f"{uri} (version {registered.version})"
        try:
            model, meta = load_model(registered.path, device, variant, fold, expected=identity,
                                     model_params=registered.model_params)  # fmt: skip
        except SegmentError as exc:  # it names the temporary file: name the registered version too
            raise SegmentError(f"{label}: {exc}") from None
    return model, meta, label


def describe_checkpoint(checkpoint: str | Path, variant: str, meta: dict) -> str:
    """One line saying what the checkpoint was trained without: its fold's held-out classes."""

    identity = meta.get("identity") or {}
    fold = identity.get("fold")
    if fold is None:
        return (f"{checkpoint}: {variant}; it records no PASCAL-5i fold, so which classes its training "
                "never saw is unknown")  # fmt: skip
    protocol = f", {identity['protocol']} protocol" if identity.get("protocol") else ""
    return (
        f"{checkpoint}: {variant} trained on PASCAL-5i fold {fold}{protocol}; classes held out of its "
        f"training (never seen, the ones it was tested on): {', '.join(held_out_classes(fold))}"
    )


def resolve_precision(amp: bool | str, device) -> bool:
    """``--amp`` (``false``, ``true`` or ``auto``, as ``evaluate.amp``) -> autocast on or off on
    ``device`` (:func:`simprop.infra.device.resolve_amp`), with segment's error."""
    if isinstance(amp, str) and amp.lower() in ("true", "false"):
        amp = amp.lower() == "true"
    try:
        return resolve_amp(amp, device)
    except ValueError:
        raise SegmentError(f"amp {amp!r}: use false, true or auto (bf16 where this device has it natively)") from None


def encode_images(model, images, amp: bool = False):
    """The encoder's outputs [N, C, h, w] of normalised images [N, 3, S, S] (frozen backbone, then the
    projection), as the evaluate stage reads them (:meth:`simprop.model.network.SimPropNet.encode`),
    under autocast when ``amp`` (as the evaluate stage's runner)."""
    with torch.inference_mode(), autocast(images.device, amp):
        return model.encode(model.backbone_features(images))


def predict_masks(model, support_encoded, support_masks, queries: Sequence[np.ndarray], size: int, device,
                  amp: bool = False) -> list[np.ndarray]:  # fmt: skip
    """Predicted foreground masks (bool, original size) for a batch of queries.

    ``support_encoded`` [K, C, h, w] (:func:`encode_images`, computed once) and ``support_masks``
    [K, S, S] are shared by every query.  As in evaluation, the margins at the network size are
    upsampled bilinearly to each query's own size and thresholded at 0
    (:func:`~simprop.engine.inference.foreground_margins`, :func:`~simprop.engine.inference.upsample_margins`).
    """
    batch = len(queries)
    query = torch.stack([to_tensor(q, size) for q in queries]).to(device)
    with torch.inference_mode():
        margins = foreground_margins(
            model, encode_images(model, query, amp),
            support_encoded.unsqueeze(0).expand(batch, *support_encoded.shape),
            support_masks.unsqueeze(0).expand(batch, *support_masks.shape), size, device, amp,
        )  # fmt: skip
        return [(upsample_margins(margins[i : i + 1], q.shape[:2])[0, 0] > 0).cpu().numpy() for i, q in enumerate(queries)]
