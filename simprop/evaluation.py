"""Few-shot evaluation on fixed episode files (protocol.md §5).

Scores are computed at the original label resolution with 255 ignored: the
network sees square ``image_size`` inputs, its logits are upsampled bilinearly to
each query's label size, and the per-class TP/FP/FN are pooled over episodes by
:class:`simprop.metrics.EpisodeMetrics`.

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
from simprop.metrics import EpisodeMetrics, aggregate_seeds, episode_label
from simprop.params import Params


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
    pred: np.ndarray  # bool [H, W] at the original label size
    label: np.ndarray  # uint8 {0, 1, 255} episode label at the original size


@dataclass
class EpisodeRunner:
    """Runs a model over episodes with per-image feature memoisation."""

    model: torch.nn.Module
    store: ImageStore
    device: torch.device
    batch_size: int = 16
    cache: FeatureCache | None = None
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
                label = self.store.label(episode.query)
                full = F.interpolate(margin[None], size=label.shape, mode="bilinear", align_corners=True)
                pred = (full[0, 0] > 0).cpu().numpy()
                yield Prediction(episode, pred, episode_label(label, episode.cls))

    def evaluate(self, episodes: list[Episode], desc: str = "episodes") -> EpisodeMetrics:
        metrics = EpisodeMetrics()
        for p in self.predict(episodes, desc=desc):
            metrics.update(p.pred, p.label, p.episode.cls)
        return metrics


def all_foreground_metrics(store: ImageStore, episodes: Iterable[Episode]) -> EpisodeMetrics:
    """The trivial predictor that marks every pixel as foreground (a floor for any model)."""
    metrics = EpisodeMetrics()
    for e in episodes:
        label = episode_label(store.label(e.query), e.cls)
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
    runner = EpisodeRunner(model, store, device, ev.batch_size, cache)
    record: dict = {
        "variant": variant,
        "fold": fold,
        "protocol": params.splits.protocol,
        "setup": params.setup,
        "data_source": params.data.source,
        "episodes": params.episodes.num_episodes,
        "seeds": list(params.episodes.test_seeds),
        "resolution": ev.resolution,
        "image_size": ev.image_size,
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
        record["identical"] = {"miou": summary["miou"], "fbiou": summary["fbiou"], "class_iou": summary["class_iou"]}
    reference = {"all_foreground_miou": all_foreground_metrics(store, first).summary()["miou"]}
    if untrained is not None:
        baseline = EpisodeRunner(untrained, store, device, ev.batch_size, cache)
        reference["untrained_miou"] = baseline.evaluate(first, desc="untrained").summary()["miou"]
    record["reference"] = reference
    record["feature_computations"] = runner.feature_computations
    record["wall_time_s"] = round(time.perf_counter() - started, 2)
    return record, runner


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically so a killed stage never leaves a half-written metrics file."""
    from simprop.atomic import write_text

    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def qualitative_rows(params: Params, runner: EpisodeRunner, fold: int, root: Path, count: int) -> list[dict]:
    """The first ``count`` 1-shot episodes of the first test set, ready for the panel figure."""
    if count == 0:
        return []
    paths = DataPaths(root / params.data.root)
    episodes = read_episodes(paths.episode_file(fold, f"test_seed{params.episodes.test_seeds[0]}"), 1)[:count]
    rows = []
    for p in runner.predict(episodes, desc="qualitative"):
        support = p.episode.supports[0]
        rows.append(
            {
                "support": runner.store.raw_image(support),
                "support_mask": runner.store.label(support) == p.episode.cls,
                "query": runner.store.raw_image(p.episode.query),
                "pred": p.pred,
                "label": p.label,
                "caption": f"{p.episode.query} class {p.episode.cls}",
            }
        )
    return rows
