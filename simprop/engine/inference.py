"""One inference path: a model's foreground-minus-background margins for query/support
features, upsampled to the size each prediction is scored or shown at.

The evaluate stage (:class:`EpisodeRunner`), the trainer's validation and ``simprop segment``
all predict through :func:`foreground_margins` and :func:`upsample_margins`.

The network sees square ``image_size`` inputs; its logits are upsampled bilinearly to the size
of the label it is scored against (:func:`simprop.engine.metrics.scoring_label`): the query's original
label (``evaluate.resolution: original``, HSNet / PFENet) or the label resized (nearest) to
321 x 321 (``321``, CANet's code, which gave the paper's baseline numbers).

Each image's frozen backbone features are computed once per evaluation (or read
from the shared feature cache), not once per episode it appears in: an image is
a query in one episode and a support in many others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from simprop.data.datasets import (
    Episode,
    ImageStore,
    support_mask,
)
from simprop.engine.features import FeatureCache
from simprop.engine.metrics import EpisodeMetrics, confusion_counts_many, scoring_label
from simprop.infra.device import autocast


def foreground_margins(model, query_encoded: torch.Tensor, support_encoded: torch.Tensor, support_masks: torch.Tensor,
                       size: int, device: torch.device, amp: bool = False) -> torch.Tensor:  # fmt: skip
    """The network's foreground-minus-background logit margins [B, 1, size, size] (float32).

    ``query_encoded`` [B, C, h, w] and ``support_encoded`` [B, K, C, h, w] are the encoder's
    outputs (:meth:`simprop.model.network.SimPropNet.encode`), ``support_masks`` [B, K, S, S].
    A pixel is foreground where its margin is > 0: the argmax over (background, foreground),
    ties to background, as ``torch.argmax`` breaks them.  The model runs as it is (callers put
    it in eval mode), under autocast when ``amp`` (:func:`simprop.infra.device.autocast`).
    """
    with autocast(device, amp):
        logits = model(query_encoded=query_encoded, support_encoded=support_encoded, support_masks=support_masks,
                       out_size=(size, size))["query"]  # fmt: skip
    return (logits[:, 1:2] - logits[:, 0:1]).float()


def upsample_margins(margins: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Margins [B, 1, h, w] at ``size`` (height, width): bilinear with ``align_corners=True``, the
    rule the network upsamples its own logits with (:mod:`simprop.model.losses`).  Bilinear
    upsampling is linear, so upsampling the one-channel margin decides like upsampling both
    logits, up to float rounding, at half the work."""
    return F.interpolate(margins, size=tuple(size), mode="bilinear", align_corners=True)


@dataclass
class Prediction:
    episode: Episode
    pred: np.ndarray  # bool [H, W] at the scoring size (the original label's, or 321 x 321)
    label: np.ndarray  # uint8 {0, 1, 255} episode label at that size (see simprop.engine.metrics.scoring_label)
    counts: np.ndarray | None = None  # (TP, FP, FN, TN) of pred vs label, when already counted


@dataclass
class EpisodeRunner:
    """Runs a model over episodes with per-image feature memoisation."""

    model: torch.nn.Module
    store: ImageStore
    device: torch.device
    batch_size: int = 16
    cache: FeatureCache | None = None
    amp: bool = False  # evaluate.amp: the network under autocast (simprop.infra.device)
    resolution: str = "original"  # evaluate.resolution
    void: str = "ignore"  # evaluate.void
    classes: tuple[int, ...] | None = None  # the fold's classes: the mIoU is their mean
    # the model's encoder outputs, precomputed for every cached image (the trainer's
    # simprop.engine.encoded.EncodedFeatures of a frozen projection: ``get(ids)`` -> [N, C, h, w]);
    # then the runner reads them instead of running the encoder conv (not under amp)
    encoded: object | None = None
    _features: dict[str, torch.Tensor] = field(default_factory=dict)
    feature_computations: int = 0

    @torch.no_grad()
    def features(self, image_ids: list[str]) -> torch.Tensor:
        """Encoded features [N, C, h, w] on the device, each image encoded at most once.

        The frozen backbone and (in eval mode) the shared encoder conv are a function of the
        image alone, so an image that appears in many episodes is encoded once per evaluation.
        """

        def encode(chunk: list[str]) -> torch.Tensor:
            if self.encoded is not None and not self.amp:
                self.feature_computations += len(chunk)
                return self.encoded.get(chunk).to(torch.float16).cpu()
            if self.cache is not None:
                backbone = self.cache.get(chunk).to(self.device)
            else:
                images = torch.stack([self.store.image(i) for i in chunk]).to(self.device)
                with autocast(self.device, self.amp):
                    backbone = self.model.backbone_features(images)
            with autocast(self.device, self.amp):
                encoded = self.model.encode(backbone).to(torch.float16).cpu()
            self.feature_computations += len(chunk)
            return encoded

        return memoised(image_ids, self._features, self.batch_size, encode).to(self.device, torch.float32)

    @torch.no_grad()
    def predict(self, episodes: list[Episode], desc: str = "episodes") -> Iterator[Prediction]:
        self.model.eval()
        size = self.store.image_size
        for batch, query, supports, masks in episode_batches(episodes, self.batch_size, self.features, self.store, self.device, desc):
            margins = foreground_margins(self.model, query, supports, masks, size, self.device, self.amp)
            yield from score_margins(self.store, batch, margins, resolution=self.resolution, void=self.void)

    def evaluate(self, episodes: list[Episode], desc: str = "episodes") -> EpisodeMetrics:
        return evaluate_predictions(self.predict(episodes, desc=desc), self.classes)


def memoised(image_ids: list[str], memo: dict[str, torch.Tensor], batch_size: int,
             compute: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """[N, ...] features of ``image_ids``: the ones not in ``memo`` are computed ``batch_size`` at a
    time by ``compute`` and kept there, so an image shared by many episodes is computed once."""
    missing = sorted({i for i in image_ids if i not in memo})
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        memo.update(zip(chunk, compute(chunk)))
    return torch.stack([memo[i] for i in image_ids])


def episode_batches(episodes: list[Episode], batch_size: int, features: Callable[[list[str]], torch.Tensor],
                    store: ImageStore, device: torch.device, desc: str):  # fmt: skip
    """``(batch, query features [B,...], support features [B,K,...], support masks [B,K,S,S])`` per
    batch of ``episodes`` (all with the same number of supports K), with a progress bar."""
    for start in tqdm(range(0, len(episodes), batch_size), desc=desc, unit="batch", leave=False):
        batch = episodes[start : start + batch_size]
        query = features([e.query for e in batch])
        supports = features([s for e in batch for s in e.supports])
        supports = supports.view(len(batch), len(batch[0].supports), *supports.shape[1:])
        yield batch, query, supports, support_masks(store, batch, device)


def support_masks(store: ImageStore, batch: list[Episode], device: torch.device) -> torch.Tensor:
    """[B, K, S, S] {0,1} masks of every episode's supports, for its support mask class."""
    size = store.image_size
    masks = [support_mask(store.input_label(s), e.support_mask_class) for e in batch for s in e.supports]
    return torch.stack(masks).to(device).view(len(batch), len(batch[0].supports), size, size)


def score_margins(
    store: ImageStore, batch: list[Episode], margins: torch.Tensor, *, resolution: str = "original", void: str = "ignore"
) -> Iterator[Prediction]:
    """Predictions of ``batch`` from foreground-minus-background margins [B,1,h,w]: each is
    upsampled bilinearly to the size of the label it is scored against (the query's own, or
    321 x 321; :func:`simprop.engine.metrics.scoring_label`) and thresholded at 0.

    Episodes whose labels share a size are upsampled and counted in one call each (bilinear
    interpolation treats every sample of a batch on its own, so this is the per-episode result,
    bit for bit; the counts are :func:`~simprop.engine.metrics.confusion_counts_many`'s)."""
    labels = [scoring_label(store.label(e.query), e.cls, resolution=resolution, void=void) for e in batch]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for n, label in enumerate(labels):
        by_size.setdefault(label.shape, []).append(n)
    out: list[Prediction | None] = [None] * len(batch)
    for size, rows in by_size.items():
        full = upsample_margins(margins[rows], size)
        preds = (full[:, 0] > 0).cpu().numpy()
        counts = confusion_counts_many(preds, np.stack([labels[n] for n in rows]))  # one pass per size
        for n, pred, count in zip(rows, preds, counts):
            out[n] = Prediction(batch[n], pred, labels[n], count)
    yield from out


def evaluate_predictions(predictions: Iterable[Prediction], classes: tuple[int, ...] | None = None) -> EpisodeMetrics:
    """Pool predictions; ``classes``: the fold's classes the mIoU is a mean over (missing ones count 0)."""
    metrics = EpisodeMetrics(classes)
    for p in predictions:
        if p.counts is not None:
            metrics.add_counts(p.counts, p.episode.cls)
        else:
            metrics.update(p.pred, p.label, p.episode.cls)
    return metrics
