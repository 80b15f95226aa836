"""The episodes stage: fixed, seeded few-shot episode files per fold.

For each fold in ``splits.folds`` and each seed in ``episodes.test_seeds``,
``episodes/fold<i>/test_seed<s>.csv`` holds ``episodes.num_episodes`` episodes drawn from the fold's
``test.csv`` pairs; ``val_episodes/fold<i>.csv`` holds ``episodes.num_val_episodes`` episodes drawn
from ``val.csv`` pairs
(training-pool images of the held-out classes, never test images) with ``episodes.val_seed``,
which params validation keeps disjoint from the test seeds. Validation episodes serve only for
checkpoint selection.

An episode (``episodes.class_sampling``):

* ``pairs`` (the field's convention): the query is an (image, class) pair drawn uniformly from the
  pool's pairs of the fold's classes, so classes come in proportion to their pair counts, as in
  OSLSM (``OSLSM/code/ss_datalayer.py``, one item per pair), CANet (``CaNet/dataset_mask_val.py``),
  HSNet (``hsnet/data/pascal.py`` ``sample_episode``) and PFENet; then ``max_shots`` distinct
  supports among the other images of that class;
* ``uniform``: a class drawn uniformly from the fold's five, then ``max_shots + 1`` distinct images
  of it: the first is the query, the rest the supports.

Either way supports never equal the query, the k-shot supports are distinct, and the k-shot
episode uses ``support1..k``: the 1-shot episode is the 5-shot episode's first support with the
same query, which pairs 1-shot and 5-shot results.

**Mismatched supports** (the support-use control): every episode also gets ``mismatch_class``, a
class of the same fold other than its own (uniformly among the other four), and
``mismatch1..mismatch<max_shots>``, distinct images of that class from the same pool, never the
query; images not listed with the episode's own class in that pool come first (all of them are
drawn from those when there are at least ``max_shots``). They come from a separate stream,
``numpy.random.default_rng([seed, fold, MISMATCH_STREAM])``, so the episodes themselves are the
same with or without them.

Each file's episodes are drawn from ``numpy.random.default_rng([seed, fold])`` over sorted inputs,
so the same inputs and params give byte-identical files. ``provenance.json`` beside the fold
folders records the sampling rule, the streams and each file's per-class episode counts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from simprop.data.errors import EpisodeError
from simprop.data.io import (
    Episode,
    atomic_write_text,
    episode_header,
    install_tree,
    read_episodes,
    read_pairs,
    write_episodes,
)
from simprop.data.layout import DataLayout
from simprop.voc import class_name, fold_classes


def images_by_class(pairs: Sequence[tuple[str, int]], classes: Sequence[int]) -> dict[int, list[str]]:
    """Sorted, de-duplicated image ids of each class in ``classes``."""
    by_class: dict[int, set[str]] = {c: set() for c in classes}
    for image_id, cls in pairs:
        if cls in by_class:
            by_class[cls].add(image_id)
    return {c: sorted(ids) for c, ids in by_class.items()}


MISMATCH_STREAM = 0x6D69736D  # ASCII "mism": third seed word of the mismatched-support stream
CLASS_SAMPLING = ("pairs", "uniform")
PROVENANCE = "provenance.json"


def draw_episodes(
    pairs: Sequence[tuple[str, int]],
    classes: Sequence[int],
    *,
    num_episodes: int,
    max_shots: int,
    seed: int,
    fold: int,
    source: str = "pairs",
    class_sampling: str = "pairs",
    mismatch: bool = True,
) -> list[Episode]:
    """``num_episodes`` episodes with ``max_shots`` supports each, reproducible from ``(seed, fold)``.

    ``class_sampling`` and ``mismatch`` as in the module docstring. Raises :class:`EpisodeError`
    when a class has fewer than ``max_shots + 1`` images, or when mismatched supports are asked
    for with fewer than two classes.
    """
    if class_sampling not in CLASS_SAMPLING:
        raise ValueError(f"episodes.class_sampling: {class_sampling!r} is not one of {list(CLASS_SAMPLING)}")
    by_class = images_by_class(pairs, classes)
    for cls, images in by_class.items():
        if len(images) < max_shots + 1:
            raise EpisodeError(
                f"fold {fold}, {source}: class {cls} ({class_name(cls)}) has {len(images)} images that pass "
                f"the small-object filter, but {max_shots}-shot episodes need at least {max_shots + 1} "
                f"(a query and {max_shots} distinct supports). Lower episodes.max_shots, relax "
                "splits.small_object_filter, or use more data (data.synthetic.num_voc_images)."
            )
    if mismatch and len(set(classes)) < 2:
        raise EpisodeError(
            f"fold {fold}, {source}: mismatched supports need at least two classes, got {list(classes)}"
        )
    rng = np.random.default_rng([seed, fold])
    episodes = []
    if class_sampling == "pairs":
        query_pairs = [(image, cls) for cls in sorted(by_class) for image in by_class[cls]]
        for index in range(num_episodes):
            query, cls = query_pairs[int(rng.integers(len(query_pairs)))]
            others = [i for i in by_class[cls] if i != query]
            picks = rng.choice(len(others), size=max_shots, replace=False)
            episodes.append(Episode(index, query, cls, tuple(others[i] for i in picks)))
    else:
        for index in range(num_episodes):
            cls = classes[int(rng.integers(len(classes)))]
            images = by_class[cls]
            picks = rng.choice(len(images), size=max_shots + 1, replace=False)
            episodes.append(Episode(index, images[picks[0]], cls, tuple(images[i] for i in picks[1:])))
    if mismatch:
        episodes = add_mismatched_supports(episodes, by_class, max_shots=max_shots, seed=seed, fold=fold)
    return episodes


def add_mismatched_supports(
    episodes: Sequence[Episode], by_class: dict[int, list[str]], *, max_shots: int, seed: int, fold: int
) -> list[Episode]:
    """The episodes with ``mismatch_class`` and ``max_shots`` mismatched supports each, drawn from
    ``default_rng([seed, fold, MISMATCH_STREAM])`` (see the module docstring)."""
    rng = np.random.default_rng([seed, fold, MISMATCH_STREAM])
    classes = sorted(by_class)
    members = {c: set(images) for c, images in by_class.items()}
    out = []
    for e in episodes:
        others = [c for c in classes if c != e.cls]
        other = others[int(rng.integers(len(others)))]
        candidates = [i for i in by_class[other] if i != e.query]
        preferred = [i for i in candidates if i not in members[e.cls]]
        if len(preferred) >= max_shots:
            picks = [preferred[i] for i in rng.choice(len(preferred), size=max_shots, replace=False)]
        else:  # every preferred image (in random order), then the rest at random
            rest = [i for i in candidates if i in members[e.cls]]
            picks = [preferred[i] for i in rng.permutation(len(preferred))]
            picks += [rest[i] for i in rng.choice(len(rest), size=max_shots - len(picks), replace=False)]
        out.append(replace(e, mismatch_class=other, mismatch_supports=tuple(picks)))
    return out


def build_episodes(layout: DataLayout, folds: Sequence[int], params) -> dict[str, int]:
    """Write every fold's test episode files (``episodes/``) and validation episode files
    (``val_episodes/``), each tree with its ``provenance.json``; returns the number of files.

    The validation files live in their own tree so that the train stages depend on them alone:
    another test seed or episode count reruns the evaluations, not the trainings.
    ``params`` is the ``episodes`` params section (:class:`simprop.params.EpisodesParams`).
    """
    written = {"test_files": 0, "val_files": 0}
    sampling = getattr(params, "class_sampling", "pairs")

    def provenance(files: dict) -> str:
        return json.dumps({
            "class_sampling": sampling,
            "class_sampling_rule": CLASS_SAMPLING_RULES[sampling],
            "max_shots": params.max_shots,
            "episode_stream": "numpy.random.default_rng([seed, fold])",
            "mismatch_stream": f"numpy.random.default_rng([seed, fold, {MISMATCH_STREAM}])",
            "mismatch_rule": MISMATCH_RULE,
            "columns": list(episode_header(params.max_shots, mismatch=True)),
            "files": files,
        }, indent=2) + "\n"  # fmt: skip

    def tree(jobs: list[tuple[str, int, str, int, int, str]], counter: str):
        """Fills a tree with one episode file per job ``(file, fold, pool, episodes, seed, source)``
        and its provenance.json."""

        def fill(tmp: Path) -> None:
            files: dict[str, dict] = {}
            for name, fold, pool, num, seed, source in jobs:
                classes = fold_classes(fold)
                episodes = draw_episodes(
                    read_pairs(layout.split_file(fold, pool)), classes, num_episodes=num, max_shots=params.max_shots,
                    seed=seed, fold=fold, source=source, class_sampling=sampling,
                )  # fmt: skip
                write_episodes(tmp / name, episodes)
                counts = Counter(e.cls for e in episodes)
                files[name] = {
                    "pool": f"splits/fold{fold}/{pool}.csv",
                    "pool_sha256": file_sha256(layout.split_file(fold, pool)),  # checked by every reader
                    "seed": seed,
                    "episodes": len(episodes),
                    "episodes_per_class": {class_name(c): counts.get(c, 0) for c in classes},
                }
                written[counter] += 1
            atomic_write_text(tmp / PROVENANCE, provenance(files))

        return fill

    test_jobs = [(f"fold{fold}/test_seed{seed}.csv", fold, "test", params.num_episodes, seed, f"test.csv (seed {seed})")
                 for fold in folds for seed in params.test_seeds]  # fmt: skip
    val_jobs = [(f"fold{fold}.csv", fold, "val", params.num_val_episodes, params.val_seed, "val.csv (validation episodes)")
                for fold in folds]  # fmt: skip
    install_tree(layout.episodes, tree(test_jobs, "test_files"))
    install_tree(layout.val_episodes, tree(val_jobs, "val_files"))
    return written


CLASS_SAMPLING_RULES = {
    "pairs": "query = a uniformly drawn (image, class) pair of the pool, then max_shots distinct other "
    "images of its class (OSLSM / CANet / HSNet / PFENet convention)",
    "uniform": "class uniformly among the fold's classes, then max_shots + 1 distinct images of it "
    "(query first)",
}
MISMATCH_RULE = (
    "mismatch_class uniformly among the fold's other classes; mismatch1..K distinct images of it from "
    "the same pool, never the query, those not listed with the episode's class first"
)


# --------------------------------------------------------------------------- reading, checked


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_test_episodes(layout: DataLayout, fold: int, seed: int, shots: int | None = None) -> list[Episode]:
    """The test set ``seed`` of ``fold``, checked (:func:`check_episodes`) against the fold's test list."""
    return _checked(layout, layout.episodes, f"fold{fold}/test_seed{seed}.csv", fold, "test", shots)


def read_validation_episodes(layout: DataLayout, fold: int, shots: int | None = None) -> list[Episode]:
    """The validation episodes of ``fold``, checked against the fold's validation list."""
    return _checked(layout, layout.val_episodes, f"fold{fold}.csv", fold, "val", shots)


def _checked(layout: DataLayout, tree: Path, name: str, fold: int, pool: str, shots: int | None) -> list[Episode]:
    path, pool_file = tree / name, layout.split_file(fold, pool)
    episodes = read_episodes(path, shots)
    check_provenance(path, tree / PROVENANCE, name, pool_file)
    check_episodes(path, episodes, read_pairs(pool_file), fold, pool_file)
    return episodes


def check_provenance(path: Path, provenance: Path, name: str, pool_file: Path) -> None:
    """``path`` must have been drawn from ``pool_file`` as it is now (the sha256 the episodes
    stage recorded in the tree's provenance.json), not from another list."""
    hint = "rerun `dvc repro episodes` (or `dvc checkout`) to restore the episode files"
    try:
        recorded = json.loads(provenance.read_text())["files"][name]["pool_sha256"]
    except FileNotFoundError:
        raise EpisodeError(f"{path}: its tree has no {provenance.name} (where it came from is unknown); {hint}") from None
    except (KeyError, TypeError, ValueError):
        raise EpisodeError(f"{path}: {provenance} records no digest of the list it was drawn from; {hint}") from None
    if recorded != file_sha256(pool_file):
        raise EpisodeError(
            f"{path}: drawn from another {pool_file} (sha256 {recorded[:12]}, the list now has "
            f"{file_sha256(pool_file)[:12]}): its episodes are not the ones this fold's list gives; {hint}"
        )


def check_episodes(path: Path, episodes: Sequence[Episode], pairs: Sequence[tuple[str, int]], fold: int,
                   pool_file: Path) -> None:  # fmt: skip
    """Every episode of ``path`` (read from it, line ``n + 2`` for episode ``n``) follows the rules
    its reader relies on; the first one broken raises :class:`EpisodeError` naming the file, the
    line and the rule.  Rules: the class is one of the fold's; the query and every support (and
    every mismatched support, of its class) are in the fold's list ``pool_file`` with that class,
    i.e. present in their label; supports are distinct from the query and from each other; the
    mismatched class is another class of the fold."""
    classes = set(fold_classes(fold))
    listed = set(pairs)
    hint = "rerun `dvc repro episodes` (or `dvc checkout`) to restore the file"

    def fail(line: int, rule: str) -> None:
        raise EpisodeError(f"{path}, line {line}: {rule}; {hint}")

    for line, e in enumerate(episodes, start=2):
        if e.cls not in classes:
            fail(line, f"class {e.cls} is not one of fold {fold}'s classes {sorted(classes)}")
        groups = [("query", (e.query,), e.cls), ("support", e.supports, e.cls)]
        if e.mismatch_class is not None:
            if e.mismatch_class not in classes or e.mismatch_class == e.cls:
                fail(line, f"mismatch_class {e.mismatch_class} is not another of fold {fold}'s classes {sorted(classes)}")
            groups.append(("mismatched support", e.mismatch_supports, e.mismatch_class))
        for role, images, cls in groups:
            for image in images:
                if (image, cls) not in listed:
                    fail(line, f"{role} {image!r} with class {cls} is not in {pool_file} (the images of "
                               f"class {cls} this fold's episodes may use)")  # fmt: skip
            if role != "query" and (e.query in images or len(set(images)) != len(images)):
                fail(line, f"the {role}s {list(images)} repeat an image or the query {e.query!r}")
