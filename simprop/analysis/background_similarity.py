"""Background similarity (paper §3.1, Figure 3).

For N pairs (A, B) of images that both contain class c, the masked-average-pooled (MAP) vectors
of the frozen ResNet-50 layer2+layer3 features are computed over

* the foreground, pixels of class c:                      Zf(A), Zf(B)
* the background, pixels of neither class c nor void:     Zb(A), Zb(B)

and the cosine similarities cos(Zf(A), Zf(B)) and cos(Zb(A), Zb(B)) are averaged per class.  The
paper finds the background similarity larger than the foreground similarity for every class
(4000 pairs, i.e. 200 per class), the premise for its foreground/background attentive fusion.

Images come from every split list of the folds in ``splits.folds`` (training and test pools
alike, all 20 classes); they are resized to ``evaluate.image_size`` and labels resized by
nearest neighbour, exactly as the network sees them, and the masks are then pooled onto the
feature grid with the model's :func:`simprop.model.prototypes.masked_average_pool`.  A pair whose
foreground or background vanishes on the feature grid is skipped (and counted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from simprop.analysis.common import (
    AnalysisError,
    backbone_note,
    feature_cache_for,
    images_by_class,
    markdown_table,
    mean_std,
    sample_pairs,
    write_csv,
)
from simprop.data.datasets import DataPaths, ImageStore, read_pairs, resize_label
from simprop.engine.visualize import save_figure
from simprop.infra.atomic import write_json, write_text
from simprop.infra.device import resolve_device
from simprop.model.encoder import build_backbone
from simprop.model.prototypes import masked_average_pool, region_is_empty
from simprop.voc import IGNORE_INDEX, class_name

SPLIT_NAMES = ("train", "val", "test")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0 when either is all zero)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def class_images(params, root: Path) -> dict[int, list[str]]:
    """Image ids per class id from the split lists of every fold in ``splits.folds``."""

    paths = DataPaths(root / params.data.root)
    pairs: list[tuple[str, int]] = []
    found = []
    for fold in params.splits.folds:
        for name in SPLIT_NAMES:
            path = paths.split(fold, name)
            if path.is_file():
                found.append(path)
                pairs.extend(read_pairs(path))
    if not found:
        raise AnalysisError(
            f"{paths.root / 'splits'}: no split lists (fold<i>/{{train,val,test}}.csv); run the data "
            "stages first (dvc repro splits)"
        )
    return images_by_class(pairs)


def map_vectors(backbone, store, wanted: dict[str, set[int]], device, batch_size: int,
                cache=None) -> dict[tuple[str, int], tuple]:  # fmt: skip
    """(image, class) -> (Zf, Zb, foreground empty?, background empty?) as numpy vectors.

    ``wanted`` maps each image id to the classes whose vectors are needed; the backbone runs once
    per image, or its features come from ``cache`` (:func:`simprop.analysis.common.feature_cache_for`).
    """
    import torch


    out: dict[tuple[str, int], tuple] = {}
    ids = sorted(wanted)
    size = store.image_size
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        if cache is not None:
            feats = cache.get(chunk).to(device)
        else:
            images = torch.stack([store.image(i) for i in chunk]).to(device)
            with torch.inference_mode():
                feats = backbone(images).float()
        grid = tuple(feats.shape[-2:])
        for k, image_id in enumerate(chunk):
            label = resize_label(store.label(image_id), size).to(device)
            for cls in sorted(wanted[image_id]):
                fg = (label == cls).float()[None]
                bg = ((label != cls) & (label != IGNORE_INDEX)).float()[None]
                zf, _ = masked_average_pool(feats[k : k + 1], fg)
                zb, _ = masked_average_pool(feats[k : k + 1], bg)
                fg_empty = bool(region_is_empty(fg, grid)[0][0])
                bg_empty = bool(region_is_empty(bg, grid)[0][0])
                out[(image_id, cls)] = (zf[0].cpu().numpy(), zb[0].cpu().numpy(), fg_empty, bg_empty)
    return out


def run_background_similarity(params, root: Path = Path("."), device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Figure 3's numbers: per-class mean/std cosine similarity of foreground and background MAPs."""

    a = params.analysis
    rng = np.random.default_rng(a.seed)
    by_class = class_images(params, root)
    pairs = sample_pairs(by_class, a.background_pairs_per_class, rng)
    if not pairs:
        raise AnalysisError("no class has two images in the split lists; nothing to compare")
    wanted: dict[str, set[int]] = {}
    for cls, img_a, img_b in pairs:
        wanted.setdefault(img_a, set()).add(cls)
        wanted.setdefault(img_b, set()).add(cls)

    torch_device = resolve_device(device or params.evaluate.device, "evaluate.device")
    backbone = build_backbone(params.model.backbone_weights, params.model.backbone_seed).to(torch_device).eval()
    store = ImageStore(DataPaths(root / params.data.root), params.evaluate.image_size, memoise=False)
    cache = feature_cache_for(params, root, backbone)
    vectors = map_vectors(backbone, store, wanted, torch_device, params.analysis.batch_size, cache)

    per_pair = []
    skipped = 0
    for cls, img_a, img_b in pairs:
        zf_a, zb_a, fe_a, be_a = vectors[(img_a, cls)]
        zf_b, zb_b, fe_b, be_b = vectors[(img_b, cls)]
        if fe_a or fe_b or be_a or be_b:
            skipped += 1
            continue
        per_pair.append(
            {"class": cls, "image_a": img_a, "image_b": img_b, "fg_cosine": cosine(zf_a, zf_b), "bg_cosine": cosine(zb_a, zb_b)}
        )
    if not per_pair:
        raise AnalysisError("every sampled pair had an empty foreground or background on the feature grid")

    per_class = []
    for cls in sorted({p["class"] for p in per_pair}):
        rows = [p for p in per_pair if p["class"] == cls]
        fg_mean, fg_std = mean_std([r["fg_cosine"] for r in rows])
        bg_mean, bg_std = mean_std([r["bg_cosine"] for r in rows])
        per_class.append(
            {
                "class_id": cls, "class": class_name(cls), "pairs": len(rows),
                "fg_mean": fg_mean, "fg_std": fg_std, "bg_mean": bg_mean, "bg_std": bg_std,
                "bg_minus_fg": bg_mean - fg_mean,
            }
        )  # fmt: skip
    fg_all, fg_all_std = mean_std([p["fg_cosine"] for p in per_pair])
    bg_all, bg_all_std = mean_std([p["bg_cosine"] for p in per_pair])
    return {
        "analysis": "background_similarity",
        "backbone": backbone_note(params.model.backbone_weights),
        "backbone_weights": params.model.backbone_weights,
        "image_size": params.evaluate.image_size,
        "pairs_per_class_requested": a.background_pairs_per_class,
        "pairs": len(per_pair),
        "pairs_skipped_empty_region": skipped,
        "classes": len(per_class),
        "fg_cosine_mean": fg_all,
        "fg_cosine_std": fg_all_std,
        "bg_cosine_mean": bg_all,
        "bg_cosine_std": bg_all_std,
        "classes_bg_above_fg": sum(1 for r in per_class if r["bg_mean"] > r["fg_mean"]),
        "per_class": per_class,
        "_per_pair": per_pair,  # written to the CSV, dropped from the metrics file
    }


CLASS_COLUMNS = ("class_id", "class", "pairs", "fg_mean", "fg_std", "bg_mean", "bg_std", "bg_minus_fg")


def write_background_similarity(result: dict[str, Any], metrics_path: Path, report_dir: Path) -> list[Path]:
    """Metrics JSON, per-class CSV, per-pair CSV, markdown table and the Figure-3-style plot."""
    metrics = {k: v for k, v in result.items() if not k.startswith("_")}
    written = [write_json(metrics_path, metrics)]
    written.append(write_csv(report_dir / "background_similarity.csv", result["per_class"], CLASS_COLUMNS))
    written.append(
        write_csv(
            report_dir / "background_similarity_pairs.csv",
            result["_per_pair"],
            ("class", "image_a", "image_b", "fg_cosine", "bg_cosine"),
        )
    )
    rows = [
        (r["class"], r["pairs"], r["fg_mean"], r["fg_std"], r["bg_mean"], r["bg_std"]) for r in result["per_class"]
    ]
    rows.append(("**all**", result["pairs"], result["fg_cosine_mean"], result["fg_cosine_std"],
                 result["bg_cosine_mean"], result["bg_cosine_std"]))  # fmt: skip
    text = (
        "# Background similarity (paper Figure 3)\n\n"
        f"Cosine similarity of foreground and of background MAP vectors of same-class image pairs. "
        f"Features: {result['backbone']}; input {result['image_size']}x{result['image_size']}. "
        f"{result['pairs']} pairs ({result['pairs_skipped_empty_region']} skipped: a region empty on "
        f"the feature grid). Background above foreground for {result['classes_bg_above_fg']} of "
        f"{result['classes']} classes (paper: all 20, 4000 pairs).\n\n"
        + markdown_table(rows, ("class", "pairs", "FG mean", "FG std", "BG mean", "BG std"))
        + "\n![background similarity](background_similarity.png)\n"
    )
    written.append(write_text(report_dir / "background_similarity.md", text))
    written.append(plot_background_similarity(result, report_dir / "background_similarity.png"))
    return written


def plot_background_similarity(result: dict[str, Any], path: Path) -> Path:
    """Per-class foreground and background mean cosine similarity (bars, std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_class"]
    x = np.arange(len(rows))
    offset = 0.15
    # markers with std error bars on an axis fitted to the data: with a random backbone every
    # similarity is close to 1, and bars from 0 would hide the foreground/background difference
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.2))
    ax.errorbar(x - offset, [r["fg_mean"] for r in rows], yerr=[r["fg_std"] for r in rows], fmt="o",
                label="foreground", color="#4c72b0", capsize=2)  # fmt: skip
    ax.errorbar(x + offset, [r["bg_mean"] for r in rows], yerr=[r["bg_std"] for r in rows], fmt="s",
                label="background", color="#dd8452", capsize=2)  # fmt: skip
    ax.set_xticks(x, [r["class"] for r in rows], rotation=60, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel("cosine similarity of MAP vectors")
    title = f"Foreground vs background similarity ({result['pairs']} same-class pairs)"
    if result.get("backbone_weights") == "none":
        title += "\nrandom backbone (synthetic setup): pipeline check, not the paper's features"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
