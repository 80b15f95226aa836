"""The episodes stage: fixed, seeded few-shot episode files per fold.

For each fold in ``splits.folds`` and each seed in ``episodes.test_seeds``,
``test_seed<s>.csv`` holds ``episodes.num_episodes`` episodes drawn from the fold's ``test.csv``
pairs; ``val.csv`` holds ``episodes.num_val_episodes`` episodes drawn from ``val.csv`` pairs
(training-pool images of the held-out classes, never test images) with ``episodes.val_seed``,
which params validation keeps disjoint from the test seeds. Validation episodes serve only for
checkpoint selection.

An episode: a class drawn uniformly from the fold's five classes, then ``max_shots + 1``
distinct images of that class drawn without replacement: the first is the query, the rest
the supports. So supports never equal the query, the k-shot supports are distinct, and the
k-shot episode uses ``support1..k``: the 1-shot episode is the 5-shot episode's first support
with the same query, which pairs 1-shot and 5-shot results.

Each file is drawn from ``numpy.random.default_rng([seed, fold])`` over sorted inputs, so the
same inputs and params give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simprop.data.errors import EpisodeError
from simprop.data.io import Episode, install_tree, read_pairs, write_episodes
from simprop.data.layout import DataLayout
from simprop.data.voc import class_name, fold_classes


def images_by_class(pairs: Sequence[tuple[str, int]], classes: Sequence[int]) -> dict[int, list[str]]:
    """Sorted, de-duplicated image ids of each class in ``classes``."""
    by_class: dict[int, set[str]] = {c: set() for c in classes}
    for image_id, cls in pairs:
        if cls in by_class:
            by_class[cls].add(image_id)
    return {c: sorted(ids) for c, ids in by_class.items()}


def draw_episodes(
    pairs: Sequence[tuple[str, int]],
    classes: Sequence[int],
    *,
    num_episodes: int,
    max_shots: int,
    seed: int,
    fold: int,
    source: str = "pairs",
) -> list[Episode]:
    """``num_episodes`` episodes with ``max_shots`` supports each, reproducible from ``(seed, fold)``.

    Raises :class:`EpisodeError` when a class has fewer than ``max_shots + 1`` images.
    """
    by_class = images_by_class(pairs, classes)
    for cls, images in by_class.items():
        if len(images) < max_shots + 1:
            raise EpisodeError(
                f"fold {fold}, {source}: class {cls} ({class_name(cls)}) has {len(images)} images that pass "
                f"the small-object filter, but {max_shots}-shot episodes need at least {max_shots + 1} "
                f"(a query and {max_shots} distinct supports). Lower episodes.max_shots, relax "
                "splits.small_object_filter, or use more data (data.synthetic.num_voc_images)."
            )
    rng = np.random.default_rng([seed, fold])
    episodes = []
    for index in range(num_episodes):
        cls = classes[int(rng.integers(len(classes)))]
        images = by_class[cls]
        picks = rng.choice(len(images), size=max_shots + 1, replace=False)
        episodes.append(Episode(index, images[picks[0]], cls, tuple(images[i] for i in picks[1:])))
    return episodes


def build_episodes(layout: DataLayout, folds: Sequence[int], params) -> dict[str, int]:
    """Write every fold's test and validation episode files; returns the number of files.

    ``params`` is the ``episodes`` params section (:class:`simprop.params.EpisodesParams`).
    """
    written = {"test_files": 0, "val_files": 0}

    def build(tmp: Path) -> None:
        for fold in folds:
            classes = fold_classes(fold)
            test_pairs = read_pairs(layout.split_file(fold, "test"))
            for seed in params.test_seeds:
                episodes = draw_episodes(
                    test_pairs, classes, num_episodes=params.num_episodes, max_shots=params.max_shots,
                    seed=seed, fold=fold, source=f"test.csv (seed {seed})",
                )  # fmt: skip
                write_episodes(tmp / f"fold{fold}" / f"test_seed{seed}.csv", episodes)
                written["test_files"] += 1
            val_pairs = read_pairs(layout.split_file(fold, "val"))
            episodes = draw_episodes(
                val_pairs, classes, num_episodes=params.num_val_episodes, max_shots=params.max_shots,
                seed=params.val_seed, fold=fold, source="val.csv (validation episodes)",
            )  # fmt: skip
            write_episodes(tmp / f"fold{fold}" / "val.csv", episodes)
            written["val_files"] += 1

    install_tree(layout.episodes, build)
    return written
