"""The checkpoint and the prediction of ``simprop segment``: the same inference path as the
evaluate stage (:func:`simprop.engine.inference.foreground_margins` and
:func:`~simprop.engine.inference.upsample_margins`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from simprop.engine.inference import foreground_margins, upsample_margins
from simprop.infra.device import resolve_device as pipeline_device
from simprop.model import CheckpointError, CheckpointIdentity, load_checkpoint
from simprop.model.checkpoint import held_out_classes
from simprop.segment.inputs import SegmentError, to_tensor


def resolve_device(device: str = "auto"):
    """The pipeline's device rule (:func:`simprop.infra.device.resolve_device`) with segment's errors."""

    try:
        return pipeline_device(device)
    except RuntimeError as exc:  # CUDA asked for but absent; torch's own "not a device" error
        if device.startswith("cuda"):
            raise SegmentError(f"device {device!r} asked for, but no CUDA GPU is available here; use --device cpu") from exc
        raise SegmentError(f"{device!r} is not a device; use auto, cpu, cuda or cuda:N") from exc


def load_model(checkpoint: str | Path, device, variant: str | None = None, fold: int | None = None):
    """Load a checkpoint as ``(model in eval mode on device, meta)``; clear errors otherwise.

    ``variant`` / ``fold``: when given, the checkpoint must have been trained as that variant on
    that PASCAL-5i fold (its recorded identity, checked by :func:`simprop.model.load_checkpoint`).
    """

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise SegmentError(
            f"{checkpoint}: checkpoint not found; train one (dvc repro) or give the path to a best.pt"
        )
    try:
        model, meta = load_checkpoint(
            checkpoint, map_location="cpu", expected=CheckpointIdentity(variant=variant, fold=fold)
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


def encode_images(model, images):
    """The encoder's outputs [N, C, h, w] of normalised images [N, 3, S, S] (frozen backbone, then the
    projection), as the evaluate stage reads them (:meth:`simprop.model.network.SimPropNet.encode`)."""
    with torch.inference_mode():
        return model.encode(model.backbone_features(images))


def predict_masks(model, support_encoded, support_masks, queries: Sequence[np.ndarray], size: int, device) -> list[np.ndarray]:
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
            model, encode_images(model, query),
            support_encoded.unsqueeze(0).expand(batch, *support_encoded.shape),
            support_masks.unsqueeze(0).expand(batch, *support_masks.shape), size, device,
        )  # fmt: skip
        return [(upsample_margins(margins[i : i + 1], q.shape[:2])[0, 0] > 0).cpu().numpy() for i, q in enumerate(queries)]
