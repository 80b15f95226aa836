"""Pieces shared by the analyses: pair sampling, device choice, loading the trained model, output."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from simprop.engine.features import open_feature_cache
from simprop.errors import AnalysisError
from simprop.infra import atomic
from simprop.model import CheckpointIdentity, expected_identity, load_checkpoint


def feature_cache_for(params, root: Path, backbone):
    """The ``features`` stage's cache when it holds this frozen ``backbone``'s features at
    ``evaluate.image_size`` (the size the analyses read images at), else ``None``.

    The analyses then read the cached layer2 + layer3 features instead of running ResNet-50 on
    their images again (what that saves: docs/performance.md, "Measurements behind code choices");
    the cache stores them in float16, as every train and evaluate stage reads them."""

    return open_feature_cache(params, root, params.evaluate.image_size, backbone.checksum())


def images_by_class(pairs: Iterable[tuple[str, int]]) -> dict[int, list[str]]:
    """``(image, class)`` pairs -> sorted, de-duplicated image ids per class id."""
    out: dict[int, set[str]] = {}
    for image, cls in pairs:
        out.setdefault(int(cls), set()).add(image)
    return {c: sorted(images) for c, images in sorted(out.items())}


def sample_pairs(
    by_class: Mapping[int, Sequence[str]], pairs_per_class: int, rng: np.random.Generator
) -> list[tuple[int, str, str]]:
    """Up to ``pairs_per_class`` distinct unordered pairs (A != B) of images per class.

    A class with n images has n(n-1)/2 possible pairs; when that is fewer than asked for, all of
    them are used.  Deterministic for a given ``rng`` state.
    """
    pairs: list[tuple[int, str, str]] = []
    for cls, images in sorted(by_class.items()):
        n = len(images)
        total = n * (n - 1) // 2
        if total == 0:
            continue
        if total <= pairs_per_class:
            chosen = [(i, j) for i in range(n) for j in range(i + 1, n)]
        else:
            seen: set[tuple[int, int]] = set()
            while len(seen) < pairs_per_class:
                i, j = rng.choice(n, size=2, replace=False)
                seen.add((min(i, j), max(i, j)))
            chosen = sorted(seen)
        pairs.extend((cls, images[i], images[j]) for i, j in chosen)
    return pairs


def load_trained_model(checkpoint: Path, variant: str, device, expected=None):
    """The analysed few-shot model and its checkpoint meta; a clear error when it is missing.

    ``expected``: the :class:`~simprop.model.checkpoint.CheckpointIdentity` the analysis needs
    (its variant, fold, protocol, backbone and fold lists); any difference is an error.
    """

    if not checkpoint.is_file():
        raise AnalysisError(
            f"{checkpoint}: checkpoint not found; train {variant} first (dvc repro train) or set "
            "analysis.variant / analysis.fold to a trained model"
        )
    model, meta = load_checkpoint(checkpoint, map_location="cpu", expected=expected or CheckpointIdentity(variant=variant))
    return model.to(device).eval(), meta


def expected_checkpoint(params, root: Path):
    """What the analysed checkpoint (``analysis.variant`` / ``analysis.fold``, the replicate of the
    first training seed of ``train.seeds``) must have been trained as."""

    return expected_identity(params, params.analysis.variant, params.analysis.fold, root)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    with atomic.replace_on_success(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in columns})
    return path


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and population std; ``(None, None)`` for no values."""
    if len(values) == 0:
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def backbone_note(backbone_weights: str) -> str:
    if backbone_weights == "imagenet":
        return "ResNet-50 layer2+layer3 with ImageNet weights (as in the paper)"
    if backbone_weights == "none":
        return (
            "ResNet-50 layer2+layer3 with RANDOM weights (model.backbone_weights=none, the default "
            "synthetic setup): the numbers test the pipeline, they do not reproduce the paper"
        )
    return f"ResNet-50 layer2+layer3 with weights from {backbone_weights}"
