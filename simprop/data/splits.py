"""The splits stage: PASCAL-5i (image, class) pair lists per fold.

Pools (``splits.protocol``, see docs/architecture.md and the reference protocol notes):

* ``oslsm`` (OSLSM / CANet / HSNet, the protocol SimPropNet compares against): training pool =
  SBD train + val + VOC2012 train, minus every VOC2012 val image;
* ``pfenet`` (PFENet / BAM): training pool = VOC2012 train + SBD ``train_noval``, de-duplicated,
  minus every VOC2012 val image;
* test pool (both): VOC2012 val.

An (image, class) pair exists when the class is in the image's SegmentationClassAug label and
passes the small-object filter (``splits.small_object_filter``, :mod:`simprop.data.filters`).

Files per fold ``i`` in ``splits.folds`` (classes ``5i+1 .. 5i+5`` held out):

* ``train.csv``: training-pool pairs of the 15 training classes (what a fold-i model learns from);
* ``val.csv``: training-pool pairs of the 5 held-out classes. Used **only** for checkpoint
  selection (validation episodes); its images are never test images. Its size is what the
  OSLSM-protocol lists publish as fold i's "training pairs" (2286 / 3425 / 5883 / 2086);
* ``test.csv``: test-pool pairs of the 5 held-out classes (published: 346 / 451 / 725 / 346).

The metrics file holds per-class and per-fold pair counts and unique image counts (published
totals: 10,092 training and 1,381 test images) so a run can be compared with the literature.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from simprop.data.errors import DataError
from simprop.data.filters import class_pixel_counts, passes
from simprop.data.io import (
    atomic_write_text,
    install_tree,
    read_id_list,
    read_label,
    write_pairs,
)
from simprop.data.layout import DataLayout
from simprop.data.progress import map_unordered, progress_bar
from simprop.voc import NUM_CLASSES, class_name, fold_classes

PUBLISHED_OSLSM = {
    "val_pairs": (2286, 3425, 5883, 2086),
    "test_pairs": (346, 451, 725, 346),
    "train_images": 10092,
    "test_images": 1381,
}

# The OSLSM-protocol lists the field publishes: HSNet's data/splits/pascal/{trn,val}/fold<i>.txt
# (github.com/juhongm999/hsnet, commit 6b1bc12), one `<image>__<class id, 2 digits>` line a pair.
# `trn/fold<i>` = fold i's own five classes in the training pool (our val.csv; training for fold i
# reads the other three folds' lists), `val/fold<i>` = the test list (our test.csv). Values: number
# of lines and md5 of the lines sorted bytewise (`LC_ALL=C sort`), each ending in a newline.
PUBLISHED_LISTS_SOURCE = "HSNet data/splits/pascal/{trn,val}/fold<i>.txt @ 6b1bc12"
PUBLISHED_LISTS = {
    "trn": {
        0: (2286, "c77fa59b78d66343404984b9f7e85cd5"),
        1: (3425, "95226cfbec75ee286fdbe32f246ffeb3"),
        2: (5883, "582d0558cc750fbfe9ab5fe9f7e21fe7"),
        3: (2086, "50490415a042edeef6db95ebeec1c7e0"),
    },
    "val": {
        0: (346, "0b0acebfa5a8c6ea5daaa6797fdbcd5e"),
        1: (451, "4318c6eab4e397a34282b95c51032e03"),
        2: (725, "b7d01149959ae68c2147f60963998fdc"),
        3: (346, "a2ef44f9cc48ee5772a53147b8d220bb"),
    },
}
OUR_LIST = {"trn": "val", "val": "test"}  # published list name -> our split file


def published_lines(pairs: Iterable[tuple[str, int]]) -> bytes:
    """The pairs as the published lists write them, ``<image>__<class 2 digits>\\n``, sorted bytewise."""
    lines = sorted(f"{image}__{cls:02d}\n".encode() for image, cls in set(pairs))
    return b"".join(lines)


def list_digest(pairs: Iterable[tuple[str, int]]) -> tuple[int, str]:
    """``(number of pairs, md5 of their sorted lines)``, comparable with :data:`PUBLISHED_LISTS`."""
    data = published_lines(pairs)
    return data.count(b"\n"), hashlib.md5(data).hexdigest()


def compare_with_published(lists: dict[int, dict[str, list[tuple[str, int]]]]) -> dict[int, dict[str, dict]]:
    """Per fold and published list (``trn``, ``val``): our count and md5 beside the published ones.

    ``lists`` maps a fold to its split lists (``{"val": pairs, "test": pairs, ...}``).
    """
    out: dict[int, dict[str, dict]] = {}
    for fold, split_lists in lists.items():
        out[fold] = {}
        for name, ours in OUR_LIST.items():
            count, md5 = list_digest(split_lists[ours])
            want_count, want_md5 = PUBLISHED_LISTS[name][fold]
            out[fold][name] = {
                "matches_published": count == want_count and md5 == want_md5,
                "ours": f"{ours}.csv",
                "pairs": count,
                "md5": md5,
                "published_pairs": want_count,
                "published_md5": want_md5,
            }
    return out


def published_warning(comparison: dict[int, dict[str, dict]]) -> str | None:
    """A loud multi-line warning naming every list that differs from the published one, or None."""
    bad = [
        (fold, name, c) for fold, lists in comparison.items() for name, c in lists.items() if not c["matches_published"]
    ]
    if not bad:
        return None
    lines = [
        "!" * 78,
        "WARNING: the fold lists differ from the published OSLSM-protocol lists",
        f"({PUBLISHED_LISTS_SOURCE}); results are not comparable with the literature's:",
    ]
    for fold, name, c in bad:
        lines.append(
            f"  fold{fold} {name} (our {c['ours']}): {c['pairs']} pairs md5 {c['md5']}, "
            f"published {c['published_pairs']} pairs md5 {c['published_md5']}"
        )
    lines += ["Check the archives (data.*_md5), splits.protocol and splits.small_object_filter.", "!" * 78]
    return "\n".join(lines)


def pools(layout: DataLayout, protocol: str) -> tuple[list[str], list[str]]:
    """``(training pool, test pool)`` image ids, sorted; the two never share an image."""
    voc_train = set(read_id_list(layout.voc_list("train")))
    voc_val = set(read_id_list(layout.voc_list("val")))
    if protocol == "oslsm":
        sbd = set(read_id_list(layout.sbd_list("train"))) | set(read_id_list(layout.sbd_list("val")))
        train = (sbd | voc_train) - voc_val
    elif protocol == "pfenet":
        train = (voc_train | set(read_id_list(layout.train_noval))) - voc_val
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose oslsm or pfenet")
    return sorted(train), sorted(voc_val)


def _class_counts(image_id: str, aug: Path) -> tuple[str, np.ndarray, np.ndarray]:
    full, sampled = class_pixel_counts(read_label(aug / f"{image_id}.png"))
    return image_id, full[: NUM_CLASSES + 1], sampled[: NUM_CLASSES + 1]


def kept_classes_per_image(
    layout: DataLayout, image_ids: Sequence[str], rule: str, *, workers: int = 0, progress: bool = True
) -> dict[str, list[int]]:
    """For each image, the classes 1..20 of its SegmentationClassAug label that pass ``rule``."""
    missing = [i for i in image_ids if not layout.label(i).exists()]
    if missing:
        raise DataError(
            f"{layout.label(missing[0])}: no SegmentationClassAug label for image {missing[0]} "
            f"({len(missing)} missing); run the augment stage"
        )
    work = partial(_class_counts, aug=layout.aug)
    kept: dict[str, list[int]] = {}

    def collect(image_id: str, full: np.ndarray, sampled: np.ndarray) -> None:
        kept[image_id] = [
            c for c in range(1, NUM_CLASSES + 1) if full[c] and passes(rule, int(full[c]), int(sampled[c]))
        ]

    with progress_bar(total=len(image_ids), desc="class statistics", unit=" labels", enabled=progress) as bar:
        for result in map_unordered(work, image_ids, workers, per_worker=64, chunksize=64):
            collect(*result)
            bar.update()
    return kept


def pairs_of(images: Iterable[str], kept: dict[str, list[int]], classes: Iterable[int]) -> list[tuple[str, int]]:
    """The (image, class) pairs of ``images`` whose class is in ``classes``, sorted by class then image."""
    wanted = set(classes)
    return sorted(((i, c) for i in images for c in kept[i] if c in wanted), key=lambda p: (p[1], p[0]))


def build_splits(
    layout: DataLayout,
    splits,
    metrics_path: Path,
    *,
    workers: int = 0,
    progress: bool = True,
    data_source: str = "synthetic",
) -> dict:
    """Write ``<root>/splits/fold<i>/{train,val,test}.csv`` and the metrics file; return the metrics.

    ``splits`` is the ``splits`` params section (:class:`simprop.params.SplitsParams`). With
    ``data_source == "voc"`` and the ``oslsm`` protocol each fold's ``val``/``test`` lists are
    compared with the published lists (:func:`compare_with_published`): ``fold<i>.matches_published``
    holds ``{"trn": bool, "val": bool}`` and ``published_lists`` the details; otherwise both are
    ``None`` (not checked) and ``published_lists.checked`` says why.
    """
    train_pool, test_pool = pools(layout, splits.protocol)
    overlap = set(train_pool) & set(test_pool)
    if overlap:  # impossible by construction; a guard against future edits
        raise DataError(f"images in both pools: {sorted(overlap)[:5]}")
    kept = kept_classes_per_image(
        layout, train_pool + test_pool, splits.small_object_filter, workers=workers, progress=progress
    )
    all_classes = range(1, NUM_CLASSES + 1)
    train_pairs = pairs_of(train_pool, kept, all_classes)
    test_pairs = pairs_of(test_pool, kept, all_classes)
    metrics: dict = {
        "train_pool_images": len(train_pool),
        "test_pool_images": len(test_pool),
        "train_images": len({i for i, _ in train_pairs}),
        "test_images": len({i for i, _ in test_pairs}),
        "classes": {
            class_name(c): {
                "train_pool_pairs": sum(1 for _, k in train_pairs if k == c),
                "test_pool_pairs": sum(1 for _, k in test_pairs if k == c),
            }
            for c in all_classes
        },
    }

    check = data_source == "voc" and splits.protocol == "oslsm"
    fold_lists: dict[int, dict[str, list[tuple[str, int]]]] = {}

    def build(tmp: Path) -> None:
        for fold in splits.folds:
            held_out = fold_classes(fold)
            lists = {
                "train": [p for p in train_pairs if p[1] not in held_out],
                "val": [p for p in train_pairs if p[1] in held_out],
                "test": [p for p in test_pairs if p[1] in held_out],
            }
            fold_lists[fold] = lists
            for name, pairs in lists.items():
                write_pairs(tmp / f"fold{fold}" / f"{name}.csv", pairs)
            metrics[f"fold{fold}"] = {
                **{f"{name}_pairs": len(pairs) for name, pairs in lists.items()},
                **{f"{name}_images": len({i for i, _ in pairs}) for name, pairs in lists.items()},
            }

    install_tree(layout.splits, build)
    comparison = compare_with_published(fold_lists) if check else {}
    for fold in splits.folds:
        metrics[f"fold{fold}"]["matches_published"] = {
            name: comparison[fold][name]["matches_published"] if check else None for name in OUR_LIST
        }
    matches = [c["matches_published"] for lists in comparison.values() for c in lists.values()]
    metrics["published_lists"] = {
        "source": PUBLISHED_LISTS_SOURCE,
        "checked": check,
        "note": (
            "data.source voc, protocol oslsm: fold<i>.val.csv vs trn/fold<i>, fold<i>.test.csv vs val/fold<i>"
            if check
            else f"not checked: data.source {data_source!r}, splits.protocol {splits.protocol!r}; the "
            "published lists are the OSLSM protocol's on VOC2012 + SBD"
        ),
        "matches_all": all(matches) if check else None,
        **{f"fold{fold}": comparison[fold] for fold in comparison},
    }
    atomic_write_text(Path(metrics_path), json.dumps(metrics, indent=2) + "\n")
    return metrics


def comparison_table(metrics: dict, folds: Sequence[int]) -> str:
    """Counts beside the published OSLSM-protocol counts (and, when checked, whether each list is
    the published one, md5 included), for the stage's log."""
    checked = metrics.get("published_lists", {}).get("checked")
    lines = [f"{'':22}{'this run':>10}{'OSLSM lists':>13}" + (f"{'same list':>11}" if checked else "")]

    def same(fold: int, name: str) -> str:
        if not checked:
            return ""
        return f"{'yes' if metrics[f'fold{fold}']['matches_published'][name] else 'NO':>11}"

    for fold in folds:
        f = metrics[f"fold{fold}"]
        lines.append(
            f"fold{fold} val pairs{'':8}{f['val_pairs']:>10}{PUBLISHED_OSLSM['val_pairs'][fold]:>13}{same(fold, 'trn')}"
        )
        lines.append(
            f"fold{fold} test pairs{'':7}{f['test_pairs']:>10}{PUBLISHED_OSLSM['test_pairs'][fold]:>13}{same(fold, 'val')}"
        )
    lines.append(f"{'unique train images':22}{metrics['train_images']:>10}{PUBLISHED_OSLSM['train_images']:>13}")
    lines.append(f"{'unique test images':22}{metrics['test_images']:>10}{PUBLISHED_OSLSM['test_images']:>13}")
    return "\n".join(lines)


def published_tag(metrics: dict, folds: Sequence[int]) -> str:
    """One line for MLflow tags and logs: ``match``, ``mismatch: fold0 trn, ...`` or ``not checked``."""
    if not metrics["published_lists"]["checked"]:
        return "not checked"
    bad = [f"fold{f} {n}" for f in folds for n, ok in metrics[f"fold{f}"]["matches_published"].items() if not ok]
    return "match" if not bad else "mismatch: " + ", ".join(bad)
