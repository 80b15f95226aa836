"""Error overlap between the few-shot model and a supervised model (paper §3.1, Table 1).

On the fold's 1-shot test episodes (the first ``analysis.overlap_episodes`` of the first test
seed) both models segment the query for the episode's class c, at the original label size:

* the few-shot (FSS) model: the trained ``analysis.variant`` checkpoint of ``analysis.fold``;
* the supervised model: torchvision's DeepLabV3-ResNet50 with its VOC-label weights
  (``COCO_WITH_VOC_LABELS_V1``, 21 classes); its prediction for c is ``argmax == c``.

Per query, FN = class-c pixels predicted as background, FP = non-void non-c pixels predicted as c.
Pooled over all episodes (percent):

* **FN overlap** = |FN_fss & FN_sup| / |FN_fss | FN_sup|   (IoU of the two models' FN regions)
* **FP overlap** = |FP_fss & FP_sup| / |FP_fss | FP_sup|
* **TP gap**     = mIoU(supervised) - mIoU(FSS), both with the protocol's per-class pooled IoU
  over the fold's test classes.

The shares of the FSS model's errors that the supervised model makes too (|FN_fss & FN_sup| /
|FN_fss|, likewise FP) are reported beside them.  The paper (DeepLab v3+, CANet) reports FN
overlap 18.32, FP overlap 9.11, TP gap 23.28: few-shot models miss regions a supervised model
gets right.  DeepLab v3+ is not in torchvision; DeepLabV3 is its closest available relative.

``analysis.supervised_weights``: ``voc`` (torchvision's weights, from its cache or downloaded),
``none`` (skip), or a path to a saved ``deeplabv3_resnet50`` state dict.  When the weights cannot
be loaded the analysis is *skipped*: the metrics file says ``{"skipped": true, "reason": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from simprop.analysis.common import (
    expected_checkpoint,
    load_trained_model,
    markdown_table,
    write_csv,
)
from simprop.analysis.error_similarity import checkpoint_path
from simprop.data.datasets import DataPaths, ImageStore, normalise, resize_label, support_mask
from simprop.data.episodes import read_test_episodes
from simprop.engine.inference import foreground_margins, upsample_margins
from simprop.engine.metrics import EpisodeMetrics, episode_label
from simprop.infra.atomic import write_json, write_text
from simprop.infra.device import resolve_device
from simprop.voc import IGNORE_INDEX, class_name

PAPER_CANET = {"fn_overlap": 18.32, "fp_overlap": 9.11, "tp_gap": 23.28}
SUPERVISED_RESIZE = 520  # torchvision's DeepLabV3 preset: shorter side resized to 520
VOC_NUM_CLASSES = 21


class SupervisedUnavailable(RuntimeError):
    """The supervised model's weights cannot be loaded; the analysis is skipped, not failed."""


# --------------------------------------------------------------------------- the counts


@dataclass
class OverlapCounts:
    """Pixel counts pooled over episodes (FN/FP of each model, their intersections and unions)."""

    fn_both: int = 0
    fn_either: int = 0
    fn_fss: int = 0
    fn_sup: int = 0
    fp_both: int = 0
    fp_either: int = 0
    fp_fss: int = 0
    fp_sup: int = 0
    episodes: int = 0

    def add(self, fss_pred: np.ndarray, sup_pred: np.ndarray, label: np.ndarray, class_id: int) -> None:
        """One episode: binary predictions of both models and the VOC class-map label."""
        if not (fss_pred.shape == sup_pred.shape == label.shape):
            raise ValueError(f"shapes differ: fss {fss_pred.shape}, supervised {sup_pred.shape}, label {label.shape}")
        valid = label != IGNORE_INDEX
        gt = label == class_id
        f, s = fss_pred.astype(bool), sup_pred.astype(bool)
        fn_f, fn_s = gt & ~f, gt & ~s
        fp_f, fp_s = valid & ~gt & f, valid & ~gt & s
        self.fn_both += int(np.count_nonzero(fn_f & fn_s))
        self.fn_either += int(np.count_nonzero(fn_f | fn_s))
        self.fn_fss += int(np.count_nonzero(fn_f))
        self.fn_sup += int(np.count_nonzero(fn_s))
        self.fp_both += int(np.count_nonzero(fp_f & fp_s))
        self.fp_either += int(np.count_nonzero(fp_f | fp_s))
        self.fp_fss += int(np.count_nonzero(fp_f))
        self.fp_sup += int(np.count_nonzero(fp_s))
        self.episodes += 1

    def summary(self) -> dict[str, float | None]:
        """Overlaps in percent (``None`` where neither model made that kind of error)."""
        return {
            "fn_overlap": _pct(self.fn_both, self.fn_either),
            "fp_overlap": _pct(self.fp_both, self.fp_either),
            "fn_fss_shared_by_supervised": _pct(self.fn_both, self.fn_fss),
            "fp_fss_shared_by_supervised": _pct(self.fp_both, self.fp_fss),
        }


def _pct(num: int, den: int) -> float | None:
    return 100.0 * num / den if den > 0 else None


def tp_gap(fss_miou: float, supervised_miou: float) -> float:
    """TP gap in percent points: supervised mIoU minus few-shot mIoU (both in percent)."""
    return supervised_miou - fss_miou


# --------------------------------------------------------------------------- the supervised model


def load_supervised(weights: str, device) -> Callable[[np.ndarray], np.ndarray]:
    """A function image uint8 [H,W,3] -> VOC class map [H,W]; :class:`SupervisedUnavailable` if not loadable."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.segmentation import (
        DeepLabV3_ResNet50_Weights,
        deeplabv3_resnet50,
    )

    if weights == "none":
        raise SupervisedUnavailable("analysis.supervised_weights is 'none' (no supervised model configured)")
    if weights == "voc":
        import socket

        hub = Path(torch.hub.get_dir()) / "checkpoints"
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20.0)
        try:
            net = deeplabv3_resnet50(weights=DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1, weights_backbone=None)
        except Exception as exc:  # noqa: BLE001 - no internet, no cache, corrupt cache
            raise SupervisedUnavailable(
                f"cannot load torchvision's DeepLabV3-ResNet50 VOC-label weights "
                f"({DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url}): {type(exc).__name__}: {exc}. "
                f"Copy that file into {hub}/ or set analysis.supervised_weights to its path"
            ) from exc
        finally:
            socket.setdefaulttimeout(previous)
    else:
        path = Path(weights)
        if not path.is_file():
            raise SupervisedUnavailable(f"analysis.supervised_weights={weights!r}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net = deeplabv3_resnet50(
                weights=None, weights_backbone=None, num_classes=VOC_NUM_CLASSES,
                aux_loss=any(k.startswith("aux_classifier.") for k in state),
            )  # fmt: skip
            net.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001
            raise SupervisedUnavailable(
                f"analysis.supervised_weights={weights!r}: not a torchvision deeplabv3_resnet50 state dict "
                f"with 21 VOC classes ({type(exc).__name__}: {exc})"
            ) from exc
    net = net.to(device).eval()


    def predict(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        scale = SUPERVISED_RESIZE / min(h, w)
        x = normalise(image)[None].to(device)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
        with torch.inference_mode():
            out = net(x)["out"]
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out.argmax(1)[0].cpu().numpy()

    return predict


# --------------------------------------------------------------------------- the analysis


def skipped_result(params, reason: str) -> dict[str, Any]:
    return {
        "analysis": "error_overlap",
        "skipped": True,
        "reason": reason,
        "variant": params.analysis.variant,
        "fold": params.analysis.fold,
        "supervised_weights": params.analysis.supervised_weights,
    }


def run_error_overlap(params, root: Path = Path("."), device: str | None = None, supervised=None, model=None) -> dict[str, Any]:
    """Table 1's numbers, or a skipped result when the supervised weights cannot be loaded.

    ``supervised``: a predictor image -> VOC class map replacing the configured DeepLabV3;
    ``model``: a few-shot model replacing the fold's best.pt.
    """
    import torch


    a = params.analysis
    torch_device = resolve_device(device or params.evaluate.device, "evaluate.device")
    if supervised is None:
        try:
            supervised = load_supervised(a.supervised_weights, torch_device)
        except SupervisedUnavailable as exc:
            return skipped_result(params, str(exc))
    checkpoint = checkpoint_path(params, root)
    if model is None:
        model, _ = load_trained_model(checkpoint, a.variant, torch_device, expected_checkpoint(params, root))
    paths = DataPaths(root / params.data.root)
    seed = params.episodes.test_seeds[0]
    episodes = read_test_episodes(paths, a.fold, seed, 1)
    if a.overlap_episodes:
        episodes = episodes[: a.overlap_episodes]
    size = params.evaluate.image_size
    store = ImageStore(paths, size, memoise=False)

    counts = OverlapCounts()
    fss_metrics, sup_metrics = EpisodeMetrics(), EpisodeMetrics()
    sup_cache: dict[str, np.ndarray] = {}
    per_class_counts: dict[int, OverlapCounts] = {}
    for start in range(0, len(episodes), params.analysis.batch_size):
        chunk = episodes[start : start + params.analysis.batch_size]
        query = torch.stack([store.image(e.query) for e in chunk]).to(torch_device)
        support = torch.stack([store.image(e.supports[0]) for e in chunk]).to(torch_device)
        masks = torch.stack(
            [support_mask(resize_label(store.label(e.supports[0]), size), e.cls) for e in chunk]
        ).to(torch_device)
        with torch.inference_mode():
            query_encoded = model.encode(model.backbone_features(query))
            support_encoded = model.encode(model.backbone_features(support))
            margins = foreground_margins(model, query_encoded, support_encoded.unsqueeze(1), masks.unsqueeze(1), size,
                                         torch_device)  # fmt: skip
        for k, e in enumerate(chunk):
            label = store.label(e.query)
            fss_pred = (upsample_margins(margins[k : k + 1], label.shape)[0, 0] > 0).cpu().numpy()
            if e.query not in sup_cache:
                sup_cache[e.query] = np.asarray(supervised(store.raw_image(e.query)), dtype=np.uint8)
            sup_pred = sup_cache[e.query] == e.cls
            counts.add(fss_pred, sup_pred, label, e.cls)
            per_class_counts.setdefault(e.cls, OverlapCounts()).add(fss_pred, sup_pred, label, e.cls)
            target = episode_label(label, e.cls)
            fss_metrics.update(fss_pred, target, e.cls)
            sup_metrics.update(sup_pred, target, e.cls)

    fss_summary, sup_summary = fss_metrics.summary(), sup_metrics.summary()
    per_class = []
    for cls in sorted(per_class_counts):
        c = per_class_counts[cls].summary()
        fss_iou = fss_summary["class_iou_by_id"].get(str(cls))
        sup_iou = sup_summary["class_iou_by_id"].get(str(cls))
        per_class.append(
            {
                "class_id": cls, "class": class_name(cls), "episodes": per_class_counts[cls].episodes,
                "fn_overlap": c["fn_overlap"], "fp_overlap": c["fp_overlap"],
                "fss_iou": fss_iou, "supervised_iou": sup_iou,
                "tp_gap": None if fss_iou is None or sup_iou is None else tp_gap(fss_iou, sup_iou),
            }
        )  # fmt: skip
    return {
        "analysis": "error_overlap",
        "skipped": False,
        "variant": a.variant,
        "fold": a.fold,
        "checkpoint": str(checkpoint),
        "supervised": "torchvision deeplabv3_resnet50",
        "supervised_weights": a.supervised_weights,
        "episodes": counts.episodes,
        "test_seed": seed,
        **counts.summary(),
        "tp_gap": tp_gap(fss_summary["miou"], sup_summary["miou"]),
        "fss_miou": fss_summary["miou"],
        "supervised_miou": sup_summary["miou"],
        "paper_canet": PAPER_CANET,
        "per_class": per_class,
    }


CLASS_COLUMNS = ("class_id", "class", "episodes", "fn_overlap", "fp_overlap", "fss_iou", "supervised_iou", "tp_gap")


def write_error_overlap(result: dict[str, Any], metrics_path: Path, report_dir: Path) -> list[Path]:
    written = [write_json(metrics_path, result)]
    # the CSV is written (header only) even when skipped, so the stage's outputs always exist
    written.append(write_csv(report_dir / "error_overlap.csv", result.get("per_class", []), CLASS_COLUMNS))
    if result.get("skipped"):
        text = f"# Error overlap with a supervised model (paper Table 1)\n\nSkipped: {result['reason']}.\n"
        written.append(write_text(report_dir / "error_overlap.md", text))
        return written
    rows = [
        (f"{result['variant']} (this run)", result["fn_overlap"], result["fp_overlap"], result["tp_gap"]),
        ("CANet (paper, vs DeepLab v3+)", PAPER_CANET["fn_overlap"], PAPER_CANET["fp_overlap"], PAPER_CANET["tp_gap"]),
    ]
    per_class = [
        (r["class"], r["episodes"], r["fn_overlap"], r["fp_overlap"], r["fss_iou"], r["supervised_iou"], r["tp_gap"])
        for r in result["per_class"]
    ]
    text = (
        "# Error overlap with a supervised model (paper Table 1)\n\n"
        f"Fold {result['fold']}, {result['episodes']} 1-shot test episodes (seed {result['test_seed']}); "
        f"supervised model: {result['supervised']} ({result['supervised_weights']} weights). Percent; "
        f"overlap = IoU of the two models' FN (FP) regions, TP gap = supervised mIoU "
        f"({result['supervised_miou']:.2f}) - few-shot mIoU ({result['fss_miou']:.2f}).\n\n"
        + markdown_table(rows, ("method", "FN overlap", "FP overlap", "TP gap"))
        + "\nShare of the few-shot model's errors the supervised model makes too: "
        f"FN {_fmt(result['fn_fss_shared_by_supervised'])}, FP {_fmt(result['fp_fss_shared_by_supervised'])}.\n\n"
        + markdown_table(per_class, ("class", "episodes", "FN overlap", "FP overlap", "FSS IoU", "supervised IoU", "TP gap"))
    )
    written.append(write_text(report_dir / "error_overlap.md", text))
    return written


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
