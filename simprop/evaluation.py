"""Few-shot evaluation on fixed episode files (protocol.md §5).

The network sees square ``image_size`` inputs; its logits are upsampled bilinearly to the size
of the label it is scored against (:func:`simprop.metrics.scoring_label`): the query's original
label (``evaluate.resolution: original``, HSNet / PFENet) or the label resized (nearest) to
321 x 321 (``321``, CANet's code, which gave the paper's baseline numbers); void pixels are
ignored (``evaluate.void: ignore``) or background (``background``, OSLSM). The per-class
TP/FP/FN are pooled over episodes by :class:`simprop.metrics.EpisodeMetrics`, whose mIoU is over
the fold's five classes (a class without a defined IoU counts as 0; ``classes_scored`` says how
many had one).

Each image's frozen backbone features are computed once per evaluation (or read
from the shared feature cache), not once per episode it appears in: an image is
a query in one episode and a support in many others.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from simprop.datasets import (
    DataPaths,
    Episode,
    ImageStore,
    read_episodes,
    read_pairs,
    resize_label,
    support_mask,
)
from simprop.features import FeatureCache
from simprop.metrics import EpisodeMetrics, aggregate_seeds, scoring_label
from simprop.params import Params
from simprop.voc import fold_classes


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; explicit names are honoured (and checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but CUDA is not available; use auto or cpu")
    return device


@dataclass
class Prediction:
    episode: Episode
    pred: np.ndarray  # bool [H, W] at the scoring size (the original label's, or 321 x 321)
    label: np.ndarray  # uint8 {0, 1, 255} episode label at that size (see simprop.metrics.scoring_label)


@dataclass
class EpisodeRunner:
    """Runs a model over episodes with per-image feature memoisation."""

    model: torch.nn.Module
    store: ImageStore
    device: torch.device
    batch_size: int = 16
    cache: FeatureCache | None = None
    resolution: str = "original"  # evaluate.resolution
    void: str = "ignore"  # evaluate.void
    classes: tuple[int, ...] | None = None  # the fold's classes: the mIoU is their mean
    _features: dict[str, torch.Tensor] = field(default_factory=dict)
    feature_computations: int = 0

    @torch.no_grad()
    def features(self, image_ids: list[str]) -> torch.Tensor:
        """Encoded features [N, C, h, w] on the device, each image encoded at most once.

        The frozen backbone and (in eval mode) the shared encoder conv are a function of the
        image alone, so an image that appears in many episodes is encoded once per evaluation.
        """
        missing = sorted({i for i in image_ids if i not in self._features})
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            if self.cache is not None:
                backbone = self.cache.get(chunk).to(self.device)
            else:
                images = torch.stack([self.store.image(i) for i in chunk]).to(self.device)
                backbone = self.model.backbone_features(images)
            encoded = self.model.encode(backbone).to(torch.float16).cpu()
            self.feature_computations += len(chunk)
            for image_id, feat in zip(chunk, encoded):
                self._features[image_id] = feat
        return torch.stack([self._features[i] for i in image_ids]).to(self.device, torch.float32)

    def _mask(self, image_id: str, cls: int) -> torch.Tensor:
        return support_mask(resize_label(self.store.label(image_id), self.store.image_size), cls)

    @torch.no_grad()
    def predict(self, episodes: list[Episode], desc: str = "episodes") -> Iterator[Prediction]:
        self.model.eval()
        size = self.store.image_size
        for start in tqdm(range(0, len(episodes), self.batch_size), desc=desc, unit="batch", leave=False):
            batch = episodes[start : start + self.batch_size]
            shots = len(batch[0].supports)
            query_feats = self.features([e.query for e in batch])
            support_ids = [s for e in batch for s in e.supports]
            support_feats = self.features(support_ids)
            support_feats = support_feats.view(len(batch), shots, *support_feats.shape[1:])
            masks = torch.stack([self._mask(s, e.cls) for e in batch for s in e.supports]).to(self.device)
            masks = masks.view(len(batch), shots, size, size)
            logits = self.model(
                query_encoded=query_feats, support_encoded=support_feats, support_masks=masks, out_size=(size, size)
            )["query"]
            # argmax over (background, foreground) == (fg - bg) > 0, and bilinear upsampling is
            # linear: upsample the one-channel margin instead of both logits (half the work).
            margins = (logits[:, 1:2] - logits[:, 0:1]).float()
            for episode, margin in zip(batch, margins):
                label = self.scoring_label(episode)
                full = F.interpolate(margin[None], size=label.shape, mode="bilinear", align_corners=True)
                pred = (full[0, 0] > 0).cpu().numpy()
                yield Prediction(episode, pred, label)

    def scoring_label(self, episode: Episode) -> np.ndarray:
        """The query's episode label in this runner's scoring convention."""
        return scoring_label(self.store.label(episode.query), episode.cls, resolution=self.resolution, void=self.void)

    def evaluate(self, episodes: list[Episode], desc: str = "episodes") -> EpisodeMetrics:
        metrics = EpisodeMetrics(self.classes)
        for p in self.predict(episodes, desc=desc):
            metrics.update(p.pred, p.label, p.episode.cls)
        return metrics


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


def evaluate_model(
    params: Params,
    model: torch.nn.Module,
    variant: str,
    fold: int,
    root: Path,
    device: torch.device,
    cache: FeatureCache | None,
    untrained: torch.nn.Module | None = None,
    log=None,
) -> tuple[dict, EpisodeRunner]:
    """All test sets, shots, the identical-input test and the reference predictors.

    Returns the metrics record (docs/architecture.md, percent) and the runner so the
    caller can draw qualitative examples from its memoised features.
    """
    ev = params.evaluate
    paths = DataPaths(root / params.data.root)
    store = ImageStore(paths, ev.image_size)
    scoring = dict(resolution=ev.resolution, void=ev.void, classes=fold_classes(fold))
    runner = EpisodeRunner(model, store, device, ev.batch_size, cache, **scoring)
    record: dict = {
        "variant": variant,
        "fold": fold,
        "protocol": params.splits.protocol,
        "setup": params.setup,
        "data_source": params.data.source,
        "episodes": params.episodes.num_episodes,
        "seeds": list(params.episodes.test_seeds),
        "class_sampling": params.episodes.class_sampling,
        "resolution": ev.resolution,
        "void": ev.void,
        "image_size": ev.image_size,
        "miou_classes": "the fold's 5 classes; a class without a defined IoU counts as 0 (classes_scored)",
    }
    started = time.perf_counter()
    for shots in ev.shots:
        per_seed = []
        entry: dict = {}
        for seed in params.episodes.test_seeds:
            episodes = read_episodes(paths.episode_file(fold, f"test_seed{seed}"), shots)
            summary = runner.evaluate(episodes, desc=f"{variant} fold{fold} {shots}-shot seed{seed}").summary()
            entry[f"seed{seed}"] = summary
            per_seed.append(summary)
            if log is not None:
                log({f"shot{shots}_seed{seed}_miou": summary["miou"], f"shot{shots}_seed{seed}_fbiou": summary["fbiou"]})
        entry.update(aggregate_seeds(per_seed))
        record[f"shot{shots}"] = entry
    first = read_episodes(paths.episode_file(fold, f"test_seed{params.episodes.test_seeds[0]}"), 1)
    if ev.identical_input:
        pairs = read_pairs(paths.split(fold, "test"))
        summary = runner.evaluate(identical_input_episodes(pairs), desc="identical input").summary()
        record["identical"] = {"miou": summary["miou"], "fbiou": summary["fbiou"], "class_iou": summary["class_iou"],
                               "classes_scored": summary["classes_scored"]}  # fmt: skip
    reference = {"all_foreground_miou": all_foreground_metrics(store, first, **scoring).summary()["miou"]}
    if untrained is not None:
        baseline = EpisodeRunner(untrained, store, device, ev.batch_size, cache, **scoring)
        reference["untrained_miou"] = baseline.evaluate(first, desc="untrained").summary()["miou"]
    record["reference"] = reference
    record["feature_computations"] = runner.feature_computations
    record["wall_time_s"] = round(time.perf_counter() - started, 2)
    return record, runner


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically so a killed stage never leaves a half-written metrics file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def qualitative_rows(params: Params, runner: EpisodeRunner, fold: int, root: Path, count: int) -> list[dict]:
    """The first ``count`` 1-shot episodes of the first test set, ready for the panel figure."""
    if count == 0:
        return []
    paths = DataPaths(root / params.data.root)
    episodes = read_episodes(paths.episode_file(fold, f"test_seed{params.episodes.test_seeds[0]}"), 1)[:count]
    rows = []
    for p in runner.predict(episodes, desc="qualitative"):
        support = p.episode.supports[0]
        query = runner.store.raw_image(p.episode.query)
        if query.shape[:2] != p.pred.shape:  # scored on 321 x 321 labels: show the query at that size
            query = np.asarray(Image.fromarray(query).resize(p.pred.shape[::-1], Image.Resampling.BILINEAR))
        rows.append(
            {
                "support": runner.store.raw_image(support),
                "support_mask": runner.store.label(support) == p.episode.cls,
                "query": query,
                "pred": p.pred,
                "label": p.label,
                "caption": f"{p.episode.query} class {p.episode.cls}",
            }
        )
    return rows
