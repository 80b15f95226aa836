"""Segment your own images with a trained checkpoint from a few examples.

This is the Python API behind ``simprop segment``::

    from simprop.segment.api import segment
    results = segment(
        "models/simpropnet/fold0/best.pt",
        supports=[("cat1.jpg", "cat1_mask.png"), ("cat2.jpg", "cat2_mask.png")],
        queries="my_photos/",          # a folder, one path or a list of paths
        out_dir="out/",
    )

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
(bilinear; masks nearest) and normalised with the ImageNet mean/std; the query logits are
upsampled (bilinear) back to each query's original size before the argmax.  With k > 1 supports
the model averages the support prototypes (its k-shot path).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from simprop.data.datasets import normalise, resize_image, resize_label
from simprop.infra.device import resolve_device as pipeline_device
from simprop.model import CheckpointError, CheckpointIdentity, load_checkpoint
from simprop.model.checkpoint import held_out_classes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VOID = 255
OVERLAY_COLOUR = (255, 40, 40)
OVERLAY_ALPHA = 0.45


class SegmentError(ValueError):
    """A bad input to :func:`segment`; the message names the file and what to do."""


@dataclass(frozen=True)
class SegmentResult:
    """One segmented query."""

    query: Path
    mask: Path  # <out_dir>/<stem>_mask.png
    overlay: Path  # <out_dir>/<stem>_overlay.png
    width: int
    height: int
    foreground_fraction: float  # share of the query's pixels predicted as foreground


# --------------------------------------------------------------------------- reading inputs


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image as ``uint8 [H, W, 3]``; :class:`SegmentError` if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise SegmentError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SegmentError(f"{path}: cannot read the image ({exc}); give a JPEG or PNG file") from exc


def read_mask(path: str | Path, class_id: int | None = None) -> np.ndarray:
    """A support mask as ``uint8 [H, W]`` with 1 = foreground, 0 = background or void.

    Binary masks (values within {0, 255} or {0, 1}) are used as they are.  Any other
    single-channel mask is read as a VOC-style index mask and needs ``class_id``: pixels equal to
    it are foreground, 255 (void) and the other classes are background.  When ``class_id`` is
    given, a mask with values {0, 1, ...} is read as an index mask too (class 1 is aeroplane).
    """
    path = Path(path)
    if not path.is_file():
        raise SegmentError(f"{path}: mask file not found")
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("P", "L", "1", "I", "I;16"):
                # palette PNGs must NOT be converted: their pixel values are the class ids
                values = np.asarray(img)
            elif mode in ("RGB", "RGBA", "LA"):
                rgb = np.asarray(img.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise SegmentError(
                        f"{path}: the mask is a colour image; save it as a single-channel PNG "
                        "(binary 0/255 or 0/1, or a VOC index/palette PNG)"
                    )
                values = rgb[..., 0]
            else:
                raise SegmentError(f"{path}: unsupported mask image mode {mode!r}; use a single-channel PNG")
    except SegmentError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SegmentError(f"{path}: cannot read the mask ({exc}); give a PNG file") from exc
    values = values.astype(np.int64)
    present = set(np.unique(values).tolist())
    if class_id is None:
        if present <= {0, 255}:
            return (values == 255).astype(np.uint8)
        if present <= {0, 1}:
            return (values == 1).astype(np.uint8)
        shown = sorted(present)[:12]
        raise SegmentError(
            f"{path}: the mask has values {shown}, so it is not binary (0/255 or 0/1); it looks "
            "like a VOC index mask: pass the class to segment with --class-id (class_id=...)"
        )
    if present <= {0, 255}:
        # a 0/255 mask is binary whatever the class: in a VOC mask 255 is only void
        return (values == 255).astype(np.uint8)
    return (values == class_id).astype(np.uint8)


def list_queries(queries: str | Path | Iterable[str | Path]) -> list[Path]:
    """Query paths from one file, a folder (its images, sorted) or a list of files/folders."""
    if isinstance(queries, (str, Path)):
        queries = [queries]
    found: list[Path] = []
    for entry in queries:
        entry = Path(entry)
        if entry.is_dir():
            images = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise SegmentError(
                    f"{entry}: the query folder holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
            found.extend(images)
        elif entry.is_file():
            found.append(entry)
        else:
            raise SegmentError(f"{entry}: query image or folder not found")
    if not found:
        raise SegmentError("no query images given")
    stems: dict[str, Path] = {}
    for path in found:
        if path.stem in stems:
            raise SegmentError(
                f"{path} and {stems[path.stem]}: two queries share the name {path.stem!r}, so their "
                "outputs would overwrite each other; rename one or segment them separately"
            )
        stems[path.stem] = path
    return found


# --------------------------------------------------------------------------- model plumbing


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
            "models/<variant>/fold<i>/best.pt written by the train stage"
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


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a folder that exists or can be created and written, else :class:`SegmentError`.

    Nothing is created here (inputs are checked before anything is written).
    """
    out = Path(out_dir)
    try:
        exists = out.exists() or out.is_symlink()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise SegmentError(f"--out {out}: impossible path ({exc.strerror or exc})") from None
    if exists:
        if not out.is_dir():
            raise SegmentError(f"--out {out}: is an existing file, not a folder; give a folder (created if missing)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise SegmentError(f"--out {out}: the folder is not writable; give a folder you can write to")
        return out
    parent = out.absolute().parent
    try:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    except OSError as exc:
        raise SegmentError(f"--out {out}: impossible path ({exc.strerror or exc})") from None
    if not parent.is_dir():
        raise SegmentError(f"--out {out}: cannot be created because {parent} is a file, not a folder")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
        path_max = os.pathconf(parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    long = [part for part in out.parts if len(os.fsencode(part)) > name_max]
    if long or len(os.fsencode(str(out.absolute()))) >= path_max:
        raise SegmentError(f"--out {out}: impossible path (a name longer than {name_max} bytes or a path too long)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SegmentError(f"--out {out}: cannot be created because {parent} is not writable")
    return out


def check_query(path: Path) -> tuple[int, int]:
    """Width and height from the query's header, without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SegmentError(f"{path}: cannot read the image ({exc}); give a JPEG or PNG file") from exc


def to_tensor(image: np.ndarray, size: int):
    """uint8 [H, W, 3] -> ImageNet-normalised float [3, size, size], exactly as in training."""

    return resize_image(normalise(image), size)


def mask_to_tensor(mask: np.ndarray, size: int):
    """uint8 {0,1} [H, W] -> float [size, size] (nearest resize, as training resizes labels)."""

    return resize_label(mask, size).float()


def predict_masks(model, support_feats, support_masks, queries: Sequence[np.ndarray], size: int, device) -> list[np.ndarray]:
    """Predicted foreground masks (bool, original size) for a batch of queries.

    ``support_feats`` [K, 1536, h, w] (backbone features, computed once) and ``support_masks``
    [K, S, S] are shared by every query.  As in evaluation, the logits at the network size are
    upsampled bilinearly to each query's own size before the argmax.
    """
    import torch
    import torch.nn.functional as F

    batch = len(queries)
    query = torch.stack([to_tensor(q, size) for q in queries]).to(device)
    with torch.inference_mode():
        query_feats = model.backbone_features(query)
        logits = model(
            query_feats=query_feats,
            support_feats=support_feats.unsqueeze(0).expand(batch, *support_feats.shape),
            support_masks=support_masks.unsqueeze(0).expand(batch, *support_masks.shape),
            out_size=(size, size),
        )["query"]
        masks = []
        for i, q in enumerate(queries):
            up = F.interpolate(logits[i : i + 1].float(), size=q.shape[:2], mode="bilinear", align_corners=True)
            masks.append(up.argmax(1)[0].cpu().numpy().astype(bool))
    return masks


# --------------------------------------------------------------------------- writing outputs


def overlay_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the foreground tinted and its border drawn in the overlay colour."""
    from scipy.ndimage import binary_erosion

    out = image.astype(np.float32).copy()
    colour = np.array(OVERLAY_COLOUR, dtype=np.float32)
    out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * colour
    border = mask & ~binary_erosion(mask, iterations=max(1, min(image.shape[:2]) // 150))
    out[border] = colour
    return out.round().clip(0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the API


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
) -> list[SegmentResult]:
    """Segment every query from the k ``supports`` with a trained checkpoint.

    ``supports``: (image path, mask path) pairs, k >= 1.  ``queries``: an image, a folder or a
    list of either.  ``class_id``: the class to take from VOC-style index masks.  ``variant`` /
    ``fold``: when given, the checkpoint must have been trained as that variant on that fold.
    ``foreground_value``: the value written for foreground pixels in ``<stem>_mask.png``
    (1..255).  ``describe``: called with one line saying which classes the checkpoint's training
    held out (its fold's test classes).  Returns one :class:`SegmentResult` per query, in input
    order.  Raises :class:`SegmentError` for bad inputs before writing.

    Order of the checks: the options and ``out_dir``, the checkpoint, the supports, then every
    query's name and header; query pixels are decoded one batch at a time while segmenting.
    """
    import torch
    from tqdm import tqdm

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
    model, meta = load_model(checkpoint, torch_device, variant, fold)
    if describe is not None:
        describe(describe_checkpoint(checkpoint, model.variant, meta))
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

    with torch.inference_mode():
        support_feats = model.backbone_features(support_imgs)

    # ---- segment into a staging folder, then move into place
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
            masks = predict_masks(model, support_feats, support_masks, batch_imgs, size, torch_device)
            for path, image, mask in zip(batch_paths, batch_imgs, masks):
                try:
                    _save_png(mask.astype(np.uint8) * np.uint8(foreground_value), staging / f"{path.stem}_mask.png")
                    _save_png(overlay_image(image, mask), staging / f"{path.stem}_overlay.png")
                except OSError as exc:
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results
