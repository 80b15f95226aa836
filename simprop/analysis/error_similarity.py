"""Similarity of mispredicted regions (paper §3.1).

For a pair (A, B) of test images of the same class c, the trained few-shot model segments A
with B as the 1-shot support and B with A as the support.  For each image two MAP vectors of the
frozen backbone features are computed:

* Zg: over the ground-truth region (pixels of class c),
* Ze: over the error region (pixels the model gets wrong: false negatives and false positives;
  void pixels excluded),

and the pair's relative error similarity is ``(Ze(A) . Ze(B)) / (Zg(A) . Zg(B))``.  The paper
reports mean 0.87 (std 0.25) over 1000 pairs of PASCAL VOC images with CANet's errors: errors
fall in regions about as similar across the pair as the objects themselves.

Differences from the paper, on purpose: the MAP features are the model's own frozen ResNet-50
layer2+layer3 (ImageNet weights in the paper setup) rather than VGG-16, and predictions and
regions are taken at the network input size (``evaluate.image_size``; labels resized by nearest
neighbour), which is where the features live.  A pair where either image has no error pixel on
the feature grid has no Ze and is left out (counted in ``pairs_without_errors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from simprop.analysis.common import (
    AnalysisError,
    backbone_note,
    expected_checkpoint,
    feature_cache_for,
    images_by_class,
    load_trained_model,
    markdown_table,
    mean_std,
    sample_pairs,
    write_csv,
)
from simprop.data.datasets import DataPaths, ImageStore, binary_target, read_pairs, resize_label
from simprop.engine.inference import foreground_margins
from simprop.infra.atomic import write_json, write_text
from simprop.infra.device import resolve_device
from simprop.layout import RunLayout
from simprop.model.prototypes import masked_average_pool, region_is_empty
from simprop.voc import class_name

PAPER_MEAN, PAPER_STD = 0.87, 0.25


def checkpoint_path(params, root: Path) -> Path:
    return RunLayout(root, params.analysis.variant, params.analysis.fold, params.train.seed).best


def test_pairs(params, root: Path, rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """``analysis.error_pairs`` same-class pairs of the fold's test images, spread over its classes."""

    by_class = images_by_class(read_pairs(DataPaths(root / params.data.root).split(params.analysis.fold, "test")))
    wanted = params.analysis.error_pairs
    quota = -(-wanted // max(1, len(by_class)))  # ceil: classes with few images leave room for others
    pairs = sample_pairs(by_class, quota, rng)
    if len(pairs) > wanted:
        keep = np.sort(rng.choice(len(pairs), size=wanted, replace=False))
        pairs = [pairs[i] for i in keep]
    if not pairs:
        raise AnalysisError(f"fold {params.analysis.fold}: no test class has two images; nothing to compare")
    return pairs


def error_region(pred, target):
    """Mispredicted pixels: prediction differs from the 0/1 target, void (255) excluded."""
    return (pred != target) & (target != 255)


def pair_ratio(ze_a, ze_b, zg_a, zg_b) -> float | None:
    """(Ze(A) . Ze(B)) / (Zg(A) . Zg(B)); ``None`` when the ground-truth product is 0."""
    denominator = float(np.dot(zg_a, zg_b))
    if denominator == 0.0:
        return None
    return float(np.dot(ze_a, ze_b)) / denominator


def run_error_similarity(params, root: Path = Path("."), device: str | None = None, model=None) -> dict[str, Any]:
    """The ratio per pair and its mean/std; ``model`` overrides loading the fold's best.pt."""
    import torch


    a = params.analysis
    rng = np.random.default_rng(a.seed)
    pairs = test_pairs(params, root, rng)
    torch_device = resolve_device(device or params.evaluate.device, "evaluate.device")
    checkpoint = checkpoint_path(params, root)
    if model is None:
        model, _ = load_trained_model(checkpoint, a.variant, torch_device, expected_checkpoint(params, root))
    size = params.evaluate.image_size
    store = ImageStore(DataPaths(root / params.data.root), size, memoise=False)
    cache = feature_cache_for(params, root, model.backbone)

    rows = []
    without_errors = 0
    half = max(1, params.analysis.batch_size // 2)
    for start in range(0, len(pairs), half):
        chunk = pairs[start : start + half]
        n = len(chunk)
        ids = [p[1] for p in chunk] + [p[2] for p in chunk]  # A's then B's
        classes = [p[0] for p in chunk] * 2
        targets = torch.stack(
            [binary_target(resize_label(store.label(i), size), c) for i, c in zip(ids, classes)]
        ).to(torch_device)
        gt = (targets == 1).float()
        swap = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(torch_device)  # A <-> B
        with torch.inference_mode():
            if cache is not None:
                feats = cache.get(ids).to(torch_device)
            else:
                feats = model.backbone_features(torch.stack([store.image(i) for i in ids]).to(torch_device))
            encoded = model.encode(feats)  # each image once: B's support is A's query and vice versa
            margins = foreground_margins(model, encoded, encoded[swap].unsqueeze(1), gt[swap].unsqueeze(1), size, torch_device)
            pred = (margins[:, 0] > 0).long()  # the argmax over (background, foreground)
            errors = error_region(pred, targets).float()
            feats = feats.float()
            ze, _ = masked_average_pool(feats, errors)
            zg, _ = masked_average_pool(feats, gt)
            no_error, _ = region_is_empty(errors, tuple(feats.shape[-2:]))
            no_gt, _ = region_is_empty(gt, tuple(feats.shape[-2:]))
        ze, zg = ze.cpu().numpy(), zg.cpu().numpy()
        for k, (cls, img_a, img_b) in enumerate(chunk):
            if bool(no_error[k]) or bool(no_error[n + k]) or bool(no_gt[k]) or bool(no_gt[n + k]):
                without_errors += 1
                continue
            ratio = pair_ratio(ze[k], ze[n + k], zg[k], zg[n + k])
            if ratio is None:
                without_errors += 1
                continue
            rows.append(
                {
                    "class": cls, "image_a": img_a, "image_b": img_b, "ratio": ratio,
                    "error_fraction_a": float(errors[k].mean()), "error_fraction_b": float(errors[n + k].mean()),
                }
            )  # fmt: skip

    ratios = [r["ratio"] for r in rows]
    mean, std = mean_std(ratios)
    per_class = []
    for cls in sorted({r["class"] for r in rows}):
        values = [r["ratio"] for r in rows if r["class"] == cls]
        c_mean, c_std = mean_std(values)
        per_class.append({"class_id": cls, "class": class_name(cls), "pairs": len(values), "ratio_mean": c_mean, "ratio_std": c_std})
    return {
        "analysis": "error_similarity",
        "variant": a.variant,
        "fold": a.fold,
        "checkpoint": str(checkpoint),
        "features": backbone_note(params.model.backbone_weights),
        "image_size": size,
        "pairs_requested": a.error_pairs,
        "pairs_sampled": len(pairs),
        "pairs": len(rows),
        "pairs_without_errors": without_errors,
        "ratio_mean": mean,
        "ratio_std": std,
        "ratio_median": float(np.median(ratios)) if ratios else None,
        "paper": {"ratio_mean": PAPER_MEAN, "ratio_std": PAPER_STD},
        "per_class": per_class,
        "_per_pair": rows,
    }


def write_error_similarity(result: dict[str, Any], metrics_path: Path, report_dir: Path) -> list[Path]:
    metrics = {k: v for k, v in result.items() if not k.startswith("_")}
    written = [write_json(metrics_path, metrics)]
    written.append(
        write_csv(report_dir / "error_similarity_pairs.csv", result["_per_pair"],
                  ("class", "image_a", "image_b", "ratio", "error_fraction_a", "error_fraction_b"))  # fmt: skip
    )
    rows = [(r["class"], r["pairs"], r["ratio_mean"], r["ratio_std"]) for r in result["per_class"]]
    rows.append(("**all**", result["pairs"], result["ratio_mean"], result["ratio_std"]))
    rows.append(("paper (CANet, VGG-16 MAPs)", 1000, PAPER_MEAN, PAPER_STD))
    text = (
        "# Similarity of mispredicted regions (paper §3.1)\n\n"
        f"(Ze(A).Ze(B)) / (Zg(A).Zg(B)) over same-class test pairs of fold {result['fold']}, with the "
        f"errors of `{result['variant']}` ({result['checkpoint']}). MAP features: {result['features']}; "
        f"input {result['image_size']}x{result['image_size']}. {result['pairs']} pairs used, "
        f"{result['pairs_without_errors']} left out (no error pixels on the feature grid).\n\n"
        + markdown_table(rows, ("class", "pairs", "ratio mean", "ratio std"))
    )
    written.append(write_text(report_dir / "error_similarity.md", text))
    return written
