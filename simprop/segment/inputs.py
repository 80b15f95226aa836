"""Reading and checking the inputs of ``simprop segment``: supports, their masks, queries and the
output folder.  Every check names the file and what to do (:class:`SegmentError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from simprop.data.datasets import normalise, resize_image, resize_label

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


VOID = 255


class SegmentError(ValueError):
    """A bad input to :func:`segment`; the message names the file and what to do."""


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
