"""The support-use controls of an evaluation (the brief: a few-shot model must use its support).

The parameter-free prototype matcher on the same frozen features (:func:`evaluate_matcher`),
the trained model with a *mismatched* support (the episode file's supports of another class of
the fold), the identical-input test (paper Table 5), the all-foreground predictor, and the gains
they are read by (:func:`support_use`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from simprop.data.datasets import (
    DataPaths,
    Episode,
    ImageStore,
)
from simprop.data.episodes import read_test_episodes
from simprop.engine.features import FeatureCache
from simprop.engine.matcher import PrototypeMatcher
from simprop.engine.metrics import EpisodeMetrics, aggregate_seeds, scoring_label
from simprop.errors import DataError
from simprop.params import Params
from simprop.voc import fold_classes


def all_foreground_metrics(
    store: ImageStore,
    episodes: Iterable[Episode],
    *,
    resolution: str = "original",
    void: str = "ignore",
    classes: tuple[int, ...] | None = None,
) -> EpisodeMetrics:
    """The trivial predictor that marks every pixel as foreground (a floor for any model)."""
    metrics = EpisodeMetrics(classes)
    for e in episodes:
        label = scoring_label(store.label(e.query), e.cls, resolution=resolution, void=void)
        metrics.update(np.ones(label.shape, dtype=bool), label, e.cls)
    return metrics


def identical_input_episodes(pairs: list[tuple[str, int]]) -> list[Episode]:
    """Paper Table 5: every test (image, class) pair with the support equal to the query."""
    return [Episode(n, image, cls, (image,)) for n, (image, cls) in enumerate(pairs)]


def mismatched_episodes(episodes: list[Episode], shots: int) -> list[Episode]:
    """The same queries with ``shots`` supports of another class (episode files' mismatch columns)."""
    if episodes and episodes[0].mismatch_class is None:
        raise DataError(
            "the episode files have no mismatched-support columns (written by an older episodes "
            "stage); rerun `dvc repro episodes`"
        )
    return [e.mismatched(shots) for e in episodes]


def support_use(record: dict) -> dict:
    """The support-use gains of an evaluation record (percentage points; None where not run)."""
    one = record.get("shot1", {}).get("miou_mean")

    def minus(a, b):
        return None if a is None or b is None else a - b

    return {
        "support_gain": minus(one, record.get("mismatched", {}).get("miou_mean")),
        "shot5_gain": minus(record.get("shot5", {}).get("miou_mean"), one),
        "identical_gain": minus(record.get("identical", {}).get("miou"), one),
        "matcher_gain": minus(one, record.get("matcher", {}).get("shot1", {}).get("miou_mean")),
    }


def evaluate_matcher(params: Params, fold: int, root: Path, device: torch.device, cache: FeatureCache | None,
                     backbone_features: Callable) -> dict:  # fmt: skip
    """The parameter-free prototype matcher on every test set and shot of ``fold``: the
    ``matcher`` entry of an evaluation record (``{"shot1": ..., "shot5": ...}``).  It reads the
    frozen backbone's features only, so it is the same for every variant of the fold."""
    ev = params.evaluate
    paths = DataPaths(root / params.data.root)
    store = ImageStore(paths, ev.image_size)
    matcher = PrototypeMatcher(store, device, backbone_features, ev.batch_size, cache,
                               resolution=ev.resolution, void=ev.void, classes=fold_classes(fold))  # fmt: skip
    return {
        f"shot{k}": over_test_sets(
            params, lambda seed, k=k: read_test_episodes(paths, fold, seed, k),
            matcher.evaluate, f"matcher_shot{k}", f"fold{fold}",
        )
        for k in ev.shots
    }  # fmt: skip


def over_test_sets(params: Params, episodes_of: Callable[[int], list[Episode]],
                evaluate: Callable[[list[Episode], str], EpisodeMetrics], name: str, label: str, log=None) -> dict:  # fmt: skip
    """One entry of an evaluation record: ``evaluate`` on every test set, per seed and aggregated."""
    entry, per_seed = {}, []
    for seed in params.episodes.test_seeds:
        summary = evaluate(episodes_of(seed), f"{label} {name} seed{seed}").summary()
        entry[f"seed{seed}"] = summary
        per_seed.append(summary)
        if log is not None:
            log(seed_metrics(name, seed, summary))
    entry.update(aggregate_seeds(per_seed))
    return entry


def seed_metrics(name: str, seed: int, summary: dict) -> dict:
    """The MLflow metrics of one test set's summary: ``<name>_seed<s>_miou`` / ``_fbiou``."""
    return {f"{name}_seed{seed}_miou": summary["miou"], f"{name}_seed{seed}_fbiou": summary["fbiou"]}
