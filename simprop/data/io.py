"""Readers and writers of the data files: id lists, label maps, pair and episode CSVs.

Label maps are always handled as ``uint8`` arrays of class indices (0 = background,
1..20 = VOC classes, 255 = ignore). VOC's ``SegmentationClass`` PNGs are palette images: they
are read as their palette *indices*, never converted to RGB or grey, which would corrupt labels.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from simprop.data.errors import DataError, LabelError
from simprop.errors import DiskFullError
from simprop.infra.atomic import disk_full_error, is_disk_full, size_of, write_text
from simprop.voc import IGNORE_INDEX, NUM_CLASSES

# ---------------------------------------------------------------------------- id lists


def read_id_list(path: Path) -> list[str]:
    """Image ids of an ``ImageSets``-style list, one a line, in file order."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: image list not found; run the download stage first") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_id_list(path: Path, ids: Iterable[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(f"{i}\n" for i in ids))


# ---------------------------------------------------------------------------- label maps


def check_label(label: np.ndarray, source: Path | str) -> np.ndarray:
    """Return ``label`` as a 2-D uint8 array, or raise :class:`LabelError` naming ``source``."""
    if label.ndim != 2 or label.size == 0:
        raise LabelError(f"{source}: label map is empty or not 2-D (shape {label.shape})")
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            raise LabelError(f"{source}: label values outside 0..255 (dtype {label.dtype})")
        label = label.astype(np.uint8)
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in present if v > NUM_CLASSES and v != IGNORE_INDEX]
    if bad:
        raise LabelError(
            f"{source}: label values {bad[:5]} are not VOC class indices (0..{NUM_CLASSES}, {IGNORE_INDEX}); "
            "was the mask converted to RGB or grey instead of kept as palette indices?"
        )
    return label


def read_palette_png(path: Path) -> np.ndarray:
    """Class indices of a VOC ``SegmentationClass`` PNG (palette mode; 255 kept as ignore).

    Single-channel ``L`` PNGs (SegmentationClassAug) are accepted too; any other mode is an
    error, because an RGB rendering of a mask does not hold class indices.
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise LabelError(
                    f"{path}: mask has mode {img.mode!r}; expected a palette ('P') PNG of class indices"
                )
            label = np.array(img)  # for 'P' this is the palette index, i.e. the class id
    except LabelError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise LabelError(f"{path}: unreadable mask ({exc})") from None
    return check_label(label, path)


def read_label(path: Path) -> np.ndarray:
    """A SegmentationClassAug label (single-channel PNG of class indices)."""
    return read_palette_png(path)


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class map of an SBD ``cls/*.mat`` file: ``loadmat(f)['GTcls'][0]['Segmentation'][0]``."""
    from scipy.io import loadmat  # scipy.io is slow to import; only augment needs it

    try:
        mat = loadmat(path)
        label = np.asarray(mat["GTcls"][0]["Segmentation"][0])
    except FileNotFoundError:
        raise LabelError(f"{path}: SBD class map is missing") from None
    except Exception as exc:  # scipy raises many types (MatReadError, ValueError, KeyError, ...) for bad files
        raise LabelError(f"{path}: unreadable SBD class map ({type(exc).__name__}: {exc})") from None
    return check_label(label, path)


def write_label_png(path: Path, label: np.ndarray) -> None:
    """Write a label map as a single-channel (mode ``L``) PNG of class indices."""
    # compress_level 1: faster to write than the default 6, decodes as fast, larger (docs/performance.md)
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(path, format="PNG", compress_level=1)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image, reading only its header; raises naming the file."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise LabelError(f"{path}: image not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise LabelError(f"{path}: unreadable image ({exc})") from None


def load_image(path: Path) -> np.ndarray:
    """An RGB image as an ``H x W x 3`` uint8 array; raises naming the file."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


# ---------------------------------------------------------------------------- whole trees and CSV files


def install_tree(target: Path, build: Callable[[Path], object]) -> None:
    """Run ``build(tmp)`` on a fresh ``<target>.tmp-XXXX`` directory, then rename it to ``target``.

    ``target`` is replaced only after ``build`` returned; on any error the temporary directory
    is removed and an existing ``target`` is left as it was. Temporaries left by a killed run
    are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        build(tmp)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException as exc:
        written = size_of(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, DiskFullError) or (isinstance(exc, Exception) and is_disk_full(target, exc)):
            raise disk_full_error(target, written) from None  # names the tree, not a file in its temporary
        raise



def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place (:mod:`simprop.infra.atomic`)."""
    write_text(path, text)


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_pairs(path: Path, pairs: Iterable[tuple[str, int]]) -> None:
    """Write ``(image, class)`` pairs as a CSV with columns ``image,class``."""
    atomic_write_text(path, _csv_text(("image", "class"), pairs))


def read_pairs(path: Path) -> list[tuple[str, int]]:
    """``(image, class)`` pairs of a split CSV, in file order."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != ["image", "class"]:
                raise DataError(f"{path}: expected columns image,class, got {reader.fieldnames}")
            return [(row["image"], int(row["class"])) for row in reader]
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found; run the splits stage first") from None


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: segment ``cls`` in ``query`` from the ``supports``' masks.

    Episode files also carry **mismatched supports** (the support-use control): ``mismatch_class``,
    another class of the same fold, and ``mismatch_supports``, distinct images of that class (never
    the query). :meth:`mismatched` turns the episode into that control: same query, still scored
    on ``cls``, but the supports (and their masks, of :attr:`support_mask_class`) are of
    ``mismatch_class``.
    """

    index: int
    query: str
    cls: int
    supports: tuple[str, ...]
    mismatch_class: int | None = None
    mismatch_supports: tuple[str, ...] = ()
    support_class: int | None = None  # class of the support masks; None = cls

    @property
    def support_mask_class(self) -> int:
        """The class whose masks the supports are given with (``cls`` unless :meth:`mismatched`)."""
        return self.cls if self.support_class is None else self.support_class

    def shots(self, k: int) -> tuple[str, ...]:
        """The k-shot supports: always the first ``k``, so 1-shot and k-shot results are paired."""
        if not 1 <= k <= len(self.supports):
            raise ValueError(f"episode {self.index} has {len(self.supports)} supports, asked for {k}")
        return self.supports[:k]

    def mismatched(self, k: int) -> "Episode":
        """The k-shot mismatched-support episode: same query and scoring class ``cls``, the first
        ``k`` mismatch supports as supports, their masks of ``mismatch_class``."""
        if self.mismatch_class is None:
            raise ValueError(
                f"episode {self.index} has no mismatched supports; rerun the episodes stage to write them"
            )
        if not 1 <= k <= len(self.mismatch_supports):
            raise ValueError(
                f"episode {self.index} has {len(self.mismatch_supports)} mismatched supports, asked for {k}"
            )
        return replace(self, supports=self.mismatch_supports[:k], support_class=self.mismatch_class)


def episode_header(max_shots: int, mismatch: bool = False) -> tuple[str, ...]:
    header = ("episode", "query", "class", *(f"support{i}" for i in range(1, max_shots + 1)))
    if mismatch:
        header += ("mismatch_class", *(f"mismatch{i}" for i in range(1, max_shots + 1)))
    return header


def write_episodes(path: Path, episodes: Sequence[Episode]) -> None:
    """Write episodes as CSV: ``episode,query,class,support1..support<K>`` and, when the episodes
    have them, ``mismatch_class,mismatch1..mismatch<K>`` (K = max shots)."""
    max_shots = len(episodes[0].supports) if episodes else 1
    mismatch = any(e.mismatch_class is not None for e in episodes)
    for e in episodes:
        bad_mismatch = mismatch and (e.mismatch_class is None or len(e.mismatch_supports) != max_shots)
        if len(e.supports) != max_shots or bad_mismatch:
            raise ValueError(
                f"{path}: episode {e.index} has {len(e.supports)} supports and {len(e.mismatch_supports)} "
                f"mismatched supports; every episode of a file needs {max_shots} of each"
            )
    if mismatch:
        rows = ((e.index, e.query, e.cls, *e.supports, e.mismatch_class, *e.mismatch_supports) for e in episodes)
    else:
        rows = ((e.index, e.query, e.cls, *e.supports) for e in episodes)
    atomic_write_text(path, _csv_text(episode_header(max_shots, mismatch), rows))


def read_episodes(path: Path, shots: int | None = None) -> list[Episode]:
    """Episodes of a file written by :func:`write_episodes`; ``shots`` keeps only the first k
    supports (and the first k mismatched supports, when the file has them)."""
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or header[:3] != ["episode", "query", "class"] or len(header) < 4:
                raise DataError(f"{path}: not an episode file (header {header})")
            max_shots = sum(1 for name in header if name.startswith("support"))
            mismatch = "mismatch_class" in header
            if tuple(header) != episode_header(max_shots, mismatch):
                raise DataError(f"{path}: not an episode file (header {header})")
            if shots is not None and not 1 <= shots <= max_shots:
                raise DataError(f"{path}: holds {max_shots}-shot episodes, cannot give {shots} shots")
            keep = max_shots if shots is None else shots
            episodes = []
            for line, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
                extra = {}
                if mismatch:
                    first = 3 + max_shots
                    extra = {
                        "mismatch_class": int(row[first]),
                        "mismatch_supports": tuple(row[first + 1 : first + 1 + keep]),
                    }
                episodes.append(Episode(int(row[0]), row[1], int(row[2]), tuple(row[3 : 3 + keep]), **extra))
            return episodes
    except FileNotFoundError:
        raise DataError(f"{path}: episode file not found; run the episodes stage first") from None
