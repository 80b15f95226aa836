"""Segment your own images with a trained checkpoint from a few examples.

This is the Python API behind ``simprop segment``::

    from simprop.segment.api import segment
    results = segment(
        "models/simpropnet/fold0/seed0/best.pt",
        supports=[("cat1.jpg", "cat1_mask.png"), ("cat2.jpg", "cat2_mask.png")],
        queries="my_photos/",          # a folder, one path or a list of paths
        out_dir="out/",
    )
    # or a registered model version from a tracking server (docs/scale-out.md):
    segment("models:/simprop-simpropnet@fold0", ..., tracking_uri="http://mlflow.example:5000")

For every query ``<stem>.<ext>`` two files are written into ``out_dir``:

* ``<stem>_mask.png``   single-channel PNG at the query's original size, background 0 and
  foreground ``foreground_value`` (255 by default, 1 for 0/1 masks, or a VOC class id);
* ``<stem>_overlay.png`` the query with the predicted foreground tinted and outlined.

Inputs are k support (image, mask) pairs and any number of query images of any size.  A support
mask is either a binary PNG (values {0, 255} or {0, 1}) or a VOC-style index PNG (palette or
grey, class ids 0..20, 255 = void) together with ``class_id``: pixels equal to ``class_id`` are
foreground and void pixels are ignored (treated as background, as in training).

Every input is checked before anything is written, and before any query's pixels are decoded:
an output folder that exists or can be created and written, a checkpoint that loads safely (of
the requested ``variant`` and ``fold`` when given), readable supports with each mask the same
size as its image and non-empty after class selection, distinct query names and readable query
headers.  Queries are then decoded one batch at a time.  The outputs are first
written into a hidden staging folder inside ``out_dir`` and moved into place only when every
query has been segmented, so a failure (or Ctrl-C) half-way leaves ``out_dir`` as it was.

Preprocessing follows training: images are resized to the checkpoint's square ``image_size``
(bilinear; masks nearest) and normalised with the ImageNet mean/std; the query's
foreground-minus-background margin is upsampled (bilinear) back to its original size and
thresholded at 0, through the evaluate stage's own inference path (:mod:`simprop.engine.inference`).  With k > 1 supports
the model averages the support prototypes (its k-shot path).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from simprop.infra.atomic import free_bytes, is_disk_full, size_of
from simprop.segment.inputs import (
    VOID,
    SegmentError,
    check_out_dir,
    check_query,
    list_queries,
    mask_to_tensor,
    read_image,
    read_mask,
    to_tensor,
)
from simprop.segment.outputs import SegmentResult, overlay_image, save_png
from simprop.segment.predict import (
    describe_checkpoint,
    encode_images,
    is_model_uri,
    load_model,
    load_registered_model,
    predict_masks,
    resolve_device,
    resolve_precision,
)


def segment(
    checkpoint: str | Path,
    supports: Sequence[tuple[str | Path, str | Path]],
    queries: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    class_id: int | None = None,
    variant: str | None = None,
    device: str = "auto",
    batch_size: int = 4,
    foreground_value: int = 255,
    progress: bool = True,
    fold: int | None = None,
    describe: Callable[[str], object] | None = None,
    tracking_uri: str | None = None,
    amp: bool | str = False,
) -> list[SegmentResult]:
    """Segment every query from the k ``supports`` with a trained checkpoint.

    ``supports``: (image path, mask path) pairs, k >= 1.  ``queries``: an image, a folder or a
    list of either.  ``class_id``: the class to take from VOC-style index masks.  ``variant`` /
    ``fold``: when given, the checkpoint must have been trained as that variant on that fold.
    ``foreground_value``: the value written for foreground pixels in ``<stem>_mask.png``
    (1..255).  ``describe``: called with one line saying which classes the checkpoint's training
    held out (its fold's test classes).  ``checkpoint`` may also be a registered model,
    ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, on ``tracking_uri`` (else
    ``MLFLOW_TRACKING_URI``, else the repository's sqlite store): its ``best.pt`` is downloaded and
    checked like a file (:func:`simprop.segment.predict.load_registered_model`).  ``amp``: the
    network under autocast, ``false`` / ``true`` / ``auto`` as ``evaluate.amp`` (``auto``: bf16
    where the device has it natively, float32 elsewhere; float32 keeps the masks those of the
    evaluate stage's float32 predictions).  Returns one :class:`SegmentResult` per query, in input
    order.  Raises :class:`SegmentError` for bad inputs before writing.

    Order of the checks: the options and ``out_dir``, the checkpoint, the supports, then every
    query's name and header; query pixels are decoded one batch at a time while segmenting.
    """
    # ---- validate everything before touching out_dir (and before decoding any query)
    if not supports:
        raise SegmentError("give at least one support (image, mask) pair")
    if batch_size < 1:
        raise SegmentError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= foreground_value <= 255:
        raise SegmentError(f"foreground_value must be in 1..255, got {foreground_value}")
    if class_id is not None and not 0 <= class_id < VOID:
        raise SegmentError(f"class_id must be in 0..254, got {class_id}")
    out_dir = check_out_dir(out_dir)
    torch_device = resolve_device(device)
    use_amp = resolve_precision(amp, torch_device)
    if is_model_uri(checkpoint):
        model, meta, label = load_registered_model(str(checkpoint), tracking_uri, torch_device, variant, fold)
    else:
        model, meta = load_model(checkpoint, torch_device, variant, fold)
        label = str(checkpoint)
    if describe is not None:
        describe(describe_checkpoint(label, model.variant, meta))
    size = int(meta["image_size"])
    support_pairs = []
    for pair in supports:
        if len(pair) != 2:
            raise SegmentError(f"a support is an (image, mask) pair, got {pair!r}")
        image_path, mask_path = Path(pair[0]), Path(pair[1])
        image = read_image(image_path)
        mask = read_mask(mask_path, class_id)
        if image.shape[:2] != mask.shape:
            raise SegmentError(
                f"{mask_path}: the mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]} (width x height); give the mask made for that image"
            )
        if not mask.any():
            which = f"class {class_id}" if class_id is not None else "foreground"
            raise SegmentError(
                f"{mask_path}: the support mask has no {which} pixels; mark the object in the mask"
                + (" or pass the --class-id of an object it contains" if class_id is not None else "")
            )
        support_pairs.append((to_tensor(image, size), mask_to_tensor(mask, size)))  # keep the small tensors only
    support_imgs = torch.stack([img for img, _ in support_pairs]).to(torch_device)
    support_masks = torch.stack([m for _, m in support_pairs]).to(torch_device)
    del support_pairs
    if (support_masks.flatten(1).sum(1) == 0).any():
        raise SegmentError(
            f"a support object vanishes when its mask is resized to the model's {size}x{size} input; "
            "use a support with a larger object"
        )
    query_paths = list_queries(queries)
    for path in query_paths:  # readable headers; pixels are decoded batch by batch below
        check_query(path)
    for path in query_paths:
        for kind in ("mask", "overlay"):
            target = out_dir / f"{path.stem}_{kind}.png"
            if target.is_dir():
                raise SegmentError(f"{target}: a folder is in the way of an output file; move it or choose another --out")

    support_encoded = encode_images(model, support_imgs, use_amp)  # once, shared by every query

    # ---- segment into a staging folder, then move into place
    # the folders this call creates, deepest first: removed again if it fails, so a failure leaves
    # no empty --out behind
    created = [d for d in (out_dir, *out_dir.absolute().parents) if not d.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".simprop-segment-", dir=out_dir))
    except OSError as exc:
        raise SegmentError(f"--out {out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    results: list[SegmentResult] = []
    try:
        order = range(0, len(query_paths), batch_size)
        bar = tqdm(order, total=len(order), unit="batch", desc="segment", disable=not progress)
        for start in bar:
            batch_paths = query_paths[start : start + batch_size]
            batch_imgs = [read_image(p) for p in batch_paths]  # only this batch is held decoded
            masks = predict_masks(model, support_encoded, support_masks, batch_imgs, size, torch_device, use_amp)
            for path, image, mask in zip(batch_paths, batch_imgs, masks):
                try:
                    save_png(mask.astype(np.uint8) * np.uint8(foreground_value), staging / f"{path.stem}_mask.png")
                    save_png(overlay_image(image, mask), staging / f"{path.stem}_overlay.png")
                except OSError as exc:
                    if is_disk_full(staging / path.stem, exc):
                        raise SegmentError(
                            f"--out {out_dir}: no space left on its file system ({free_bytes(staging) / 2**20:.1f} MB "
                            f"free; {size_of(staging) / 2**20:.1f} MB of outputs written so far); nothing was "
                            "moved into --out: free some space and rerun"
                        ) from None
                    raise SegmentError(f"--out {out_dir}: cannot write the outputs ({exc.strerror or exc})") from None
                results.append(
                    SegmentResult(
                        query=path,
                        mask=out_dir / f"{path.stem}_mask.png",
                        overlay=out_dir / f"{path.stem}_overlay.png",
                        width=image.shape[1],
                        height=image.shape[0],
                        foreground_fraction=float(mask.mean()),
                    )
                )
            del batch_imgs, masks
        try:
            for result in results:
                os.replace(staging / result.mask.name, result.mask)
                os.replace(staging / result.overlay.name, result.overlay)
        except OSError as exc:
            raise SegmentError(f"--out {out_dir}: cannot move the outputs into place ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # only the ones this call made, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return results
