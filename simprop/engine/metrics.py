"""Few-shot segmentation metrics: per-class IoU, mIoU and FB-IoU (protocol.md §5).

Bookkeeping
-----------
Each episode contributes one binary prediction and one episode label for its
target class ``c`` (1 = foreground, 0 = background, 255 = void), both at the
original label resolution.  Void pixels count in neither intersection nor union.

* ``IoU_c`` = sum over the episodes of class ``c`` of TP / sum of (TP + FP + FN).
* ``mIoU``  = mean of ``IoU_c`` over the fold's classes when the accumulator knows them
  (``EpisodeMetrics(classes=fold_classes(fold))``, what evaluation does): a class without
  episodes, or whose pooled union is empty, **counts as 0**, as in the references (HSNet
  ``common/logger.py`` ``AverageMeter.compute_iou``: intersection / max(union, 1) over the fold's
  5 classes; CANet's ``train.py`` also averages its 5 classes, and fails on a class without
  episodes). Without ``classes`` the mean is over
  the classes that were seen. Either way ``summary()["classes_scored"]`` says how many classes
  had a defined IoU, so a short run never drops a class silently.
* ``FB-IoU`` = mean of the foreground IoU and the background IoU, each pooled over
  all episodes (every class) of the fold.

Scoring conventions (``evaluate.resolution`` / ``evaluate.void``, :func:`scoring_label`): the
label is the original one or, as CANet's code scores, resized (nearest) to 321 x 321; void is
ignored or, as OSLSM's test code does, counted as background.

Counts are kept in explicit per-class-id arrays indexed by the VOC id, never by
position in a list of "classes seen", which is how one public evaluator ended up
reporting each class' IoU under its neighbour's name.

A class whose pooled union is empty (every episode's label is void or
background and nothing was predicted) has an undefined IoU: it is reported as
``None`` (and counts as 0 in a mean over known classes, see above).  With the
small-object filter this does not happen on real splits.

Values are fractions inside the accumulator and percent in :meth:`EpisodeMetrics.summary`
and :func:`aggregate_seeds` (the units of the metrics files and the paper).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from simprop.voc import IGNORE_INDEX, NUM_CLASSES, class_name


def episode_label(label: Any, class_id: int) -> Any:
    """Binary episode label from a VOC class map: 1 where ``label == class_id``, 255 kept, else 0.

    Works on numpy arrays and torch tensors and returns the same kind (uint8).
    """
    if _is_torch(label):
        import torch

        out = (label == class_id).to(torch.uint8)
        out[label == IGNORE_INDEX] = IGNORE_INDEX
        return out
    label = np.asarray(label)
    out = (label == class_id).astype(np.uint8)
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


SCORING_SIZE_321 = 321  # CANet's released code scores 321 x 321 labels


def scoring_label(
    label: np.ndarray, class_id: int, *, resolution: str = "original", void: str = "ignore"
) -> np.ndarray:
    """The episode label a prediction is scored against (``evaluate.resolution`` / ``evaluate.void``).

    * ``resolution="original"``: the label at its own size (HSNet ``--use_original_imgsize``,
      PFENet); ``"321"``: the class map resized to 321 x 321 with PIL's nearest neighbour first,
      as CANet's ``dataset_mask_val.py`` does (``torchvision.transforms.Resize([321, 321],
      interpolation=Image.NEAREST)`` on the PIL mask), so labels are never blended.
    * ``void="ignore"``: 255 stays void (in neither intersection nor union); ``"background"``:
      void pixels are background, as OSLSM's ``test.py`` ``measure`` (``y > 0.5``) counts them.
    """
    label = np.asarray(label)
    if resolution == "321":
        from PIL import Image

        size = (SCORING_SIZE_321, SCORING_SIZE_321)
        image = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
        label = np.asarray(image.resize(size, Image.Resampling.NEAREST))
    elif resolution != "original":
        raise ValueError(f"evaluate.resolution: {resolution!r} is not 'original' or '321'")
    target = episode_label(label, class_id)
    if void == "background":
        target[target == IGNORE_INDEX] = 0
    elif void != "ignore":
        raise ValueError(f"evaluate.void: {void!r} is not 'ignore' or 'background'")
    return target


def confusion_counts(pred: Any, label: Any) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of the foreground for one binary prediction against one episode label.

    ``pred``: 0/1 (or bool) mask; ``label``: 0/1/255 mask of the same shape.  Numpy arrays
    and torch tensors (any device) are accepted; the count runs where the data lives.
    Raises ``ValueError`` for mismatched shapes or a label that is not an episode label
    (values other than 0, 1, 255: pass it through :func:`episode_label` first).
    """
    if tuple(pred.shape) != tuple(label.shape):
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}; "
            "score at the original label resolution (resize the prediction, not the label)"
        )
    if _is_torch(pred) or _is_torch(label):
        import torch

        if not _is_torch(pred):
            pred = torch.as_tensor(np.asarray(pred))
        if not _is_torch(label):
            label = torch.as_tensor(np.asarray(label))
        label = label.to(pred.device)
        label = label.to(torch.int64) if label.dtype == torch.uint8 else label
        valid = label != IGNORE_INDEX
        if bool(((label != 0) & (label != 1) & valid).any()):
            raise ValueError(_NOT_EPISODE_LABEL)
        p = (pred != 0) & valid
        g = (label == 1) & valid
        counts = torch.stack(
            [(p & g).sum(), (p & ~g).sum(), (~p & g & valid).sum(), (~p & ~g & valid).sum()]
        )
        tp, fp, fn, tn = (int(v) for v in counts.tolist())
        return tp, fp, fn, tn
    tp, fp, fn, tn = confusion_counts_many(np.asarray(pred)[None], np.asarray(label)[None])[0]
    return int(tp), int(fp), int(fn), int(tn)


def confusion_counts_many(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[B, 4] int64 (TP, FP, FN, TN) of B predictions [B, H, W] against episode labels [B, H, W]
    of one size, counted in one vectorised pass (:func:`confusion_counts` of one numpy episode
    is this with B = 1)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.ndim < 2:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} must both be [B, H, W] of one size")
    valid = labels != IGNORE_INDEX
    if np.any((labels != 0) & (labels != 1) & valid):
        raise ValueError(_NOT_EPISODE_LABEL)
    p = (preds != 0) & valid
    g = (labels == 1) & valid
    pixels = tuple(range(1, preds.ndim))  # every axis but the episode axis
    tp = np.count_nonzero(p & g, axis=pixels)
    fp = np.count_nonzero(p & ~g, axis=pixels)
    fn = np.count_nonzero(g & ~p, axis=pixels)
    tn = np.count_nonzero(valid, axis=pixels) - tp - fp - fn
    return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)


_NOT_EPISODE_LABEL = (
    "label has values other than 0, 1 and 255: it looks like a VOC class map; "
    "convert it with simprop.engine.metrics.episode_label(label, class_id)"
)


class EpisodeMetrics:
    """Accumulates TP/FP/FN/TN per VOC class id over few-shot episodes.

    >>> m = EpisodeMetrics()
    >>> m.update(pred, label, class_id=3)      # one episode, original label size
    >>> m.summary()                            # {"miou": .., "fbiou": .., "class_iou": {...}} in %
    """

    def __init__(self, classes: Sequence[int] | None = None) -> None:
        """``classes``: the VOC ids the mIoU is a mean over (a fold's five); missing ones count as 0.
        ``None``: the mean is over the classes that had episodes."""
        # row c holds the counts of VOC class id c (row 0 unused: background is not a target)
        self._counts = np.zeros((NUM_CLASSES + 1, 4), dtype=np.int64)  # TP, FP, FN, TN
        self._episodes = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
        self.classes: tuple[int, ...] | None = None
        if classes is not None:
            self.classes = tuple(sorted({int(c) for c in classes}))
            if not self.classes or not all(1 <= c <= NUM_CLASSES for c in self.classes):
                raise ValueError(f"classes must be VOC ids in 1..{NUM_CLASSES}, got {list(classes)}")

    # ------------------------------------------------------------------ accumulate

    def update(self, pred: Any, label: Any, class_id: int) -> None:
        """Add one episode: binary ``pred`` and episode ``label`` (0/1/255) of target ``class_id``."""
        self.add_counts(confusion_counts(pred, label), class_id)

    def add_counts(self, counts: Sequence[int], class_id: int) -> None:
        """Add one episode already counted: (TP, FP, FN, TN) as :func:`confusion_counts` gives them
        (or a row of :func:`confusion_counts_many`)."""
        cid = int(class_id)
        if not 1 <= cid <= NUM_CLASSES:
            raise ValueError(f"class_id must be a VOC id in 1..{NUM_CLASSES}, got {class_id}")
        if self.classes is not None and cid not in self.classes:
            raise ValueError(f"class_id {cid} is not one of this accumulator's classes {list(self.classes)}")
        if len(counts) != 4 or any(int(c) < 0 for c in counts):
            raise ValueError(f"counts must be four non-negative numbers (TP, FP, FN, TN), got {list(counts)}")
        self._counts[cid] += np.asarray(counts, dtype=np.int64)
        self._episodes[cid] += 1

    def update_many(self, preds: Iterable[Any], labels: Iterable[Any], class_ids: Iterable[int]) -> None:
        """Add several episodes (sizes may differ between episodes)."""
        for pred, label, cid in zip(preds, labels, class_ids, strict=True):
            self.update(pred, label, cid)

    def merge(self, other: "EpisodeMetrics") -> "EpisodeMetrics":
        """Add another accumulator's counts into this one (e.g. from a worker); returns self."""
        self._counts += other._counts
        self._episodes += other._episodes
        return self

    # ------------------------------------------------------------------ read out

    @property
    def num_episodes(self) -> int:
        return int(self._episodes.sum())

    def classes_seen(self) -> tuple[int, ...]:
        """VOC ids with at least one episode, ascending."""
        return tuple(int(c) for c in np.flatnonzero(self._episodes))

    def episodes_per_class(self) -> dict[int, int]:
        return {c: int(self._episodes[c]) for c in self.classes_seen()}

    def class_iou(self) -> dict[int, float]:
        """IoU (fraction) per VOC id of ``classes`` (or seen); ``nan`` where there were no episodes
        or the pooled union is empty."""
        out = {}
        for c in self.classes if self.classes is not None else self.classes_seen():
            tp, fp, fn, _ = self._counts[c]
            union = tp + fp + fn
            out[c] = float(tp / union) if union > 0 and self._episodes[c] else math.nan
        return out

    def classes_scored(self) -> int:
        """How many classes have a defined IoU (episodes and a non-empty pooled union)."""
        return sum(1 for v in self.class_iou().values() if not math.isnan(v))

    def miou(self) -> float:
        """Mean of the per-class IoUs (fraction): over ``classes`` with an undefined IoU counted as 0
        (the reference convention), or over the classes seen with a defined IoU."""
        ious = self.class_iou()
        if self.classes_scored() == 0:
            raise ValueError("no episodes with a defined IoU were added")
        if self.classes is not None:
            return float(np.mean([0.0 if math.isnan(v) else v for v in ious.values()]))
        return float(np.mean([v for v in ious.values() if not math.isnan(v)]))

    def fg_bg_iou(self) -> tuple[float, float]:
        """(foreground IoU, background IoU) as fractions, each pooled over all episodes."""
        tp, fp, fn, tn = self._counts.sum(axis=0)
        fg_union = tp + fp + fn
        bg_union = tn + fn + fp  # background "TP" is TN; its FP is our FN and vice versa
        if self.num_episodes == 0:
            raise ValueError("no episodes were added")
        fg = float(tp / fg_union) if fg_union > 0 else math.nan
        bg = float(tn / bg_union) if bg_union > 0 else math.nan
        return fg, bg

    def fbiou(self) -> float:
        """FB-IoU (fraction): mean of the pooled foreground and background IoUs."""
        return float(np.nanmean(self.fg_bg_iou()))

    def summary(self) -> dict[str, Any]:
        """Per-seed record in percent, the shape of a ``seed<s>`` entry of the evaluate metrics file.

        ``class_iou`` is keyed by VOC class name and ``class_iou_by_id`` by the id (as a string,
        for JSON); an undefined class IoU is ``None``.
        """
        ious = self.class_iou()
        fg, bg = self.fg_bg_iou()
        return {
            "miou": _pct(self.miou()),
            "fbiou": _pct(self.fbiou()),
            "fg_iou": _pct(fg),
            "bg_iou": _pct(bg),
            "class_iou": {class_name(c): _pct(v) for c, v in ious.items()},
            "class_iou_by_id": {str(c): _pct(v) for c, v in ious.items()},
            "episodes": self.num_episodes,
            # classes in the mIoU: with known classes, the ones not scored count as 0 in it
            "classes_scored": self.classes_scored(),
            "classes_in_mean": len(ious) if self.classes is not None else self.classes_scored(),
        }


def _pct(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * float(value)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


# ---------------------------------------------------------------------- over seeds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (ddof=1) of per-seed values; std is 0.0 for one value.

    The test-episode seeds are a sample of the possible episode sets, so the unbiased sample
    variance is used (the paper does not say which it used).  ``None`` entries are skipped.
    """
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if vals.size == 0:
        return math.nan, math.nan
    std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
    return float(vals.mean()), std


def aggregate_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± sample std over per-seed results (as returned by :meth:`EpisodeMetrics.summary`).

    Returns ``miou_mean, miou_std, fbiou_mean, fbiou_std, num_seeds`` and, when the inputs carry
    ``class_iou``, ``class_iou_mean`` / ``class_iou_std`` keyed by class name.  Std uses ddof=1
    (0.0 for a single seed); see :func:`mean_std`.
    """
    if not results:
        raise ValueError("aggregate_seeds needs at least one per-seed result")
    out: dict[str, Any] = {"num_seeds": len(results)}
    for key in ("miou", "fbiou"):
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([r[key] for r in results])
    if all("classes_scored" in r for r in results):  # the fewest over the test sets
        out["classes_scored"] = min(r["classes_scored"] for r in results)
    if all("class_iou" in r for r in results):
        names: list[str] = []
        for r in results:
            names += [n for n in r["class_iou"] if n not in names]
        stats = {n: mean_std([r["class_iou"].get(n) for r in results]) for n in names}
        out["class_iou_mean"] = {n: m for n, (m, _) in stats.items()}
        out["class_iou_std"] = {n: s for n, (_, s) in stats.items()}
    return out
