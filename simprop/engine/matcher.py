"""The parameter-free prototype matcher, the control every evaluation carries.

Per pixel: is the query feature closer (cosine) to the supports' foreground prototype than to
their background prototype?  It reads the same frozen features the networks start from and is
scored exactly like a network (:func:`simprop.engine.inference.score_margins`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from simprop.data.datasets import (
    Episode,
    ImageStore,
    support_mask,
)
from simprop.engine.features import FeatureCache
from simprop.engine.inference import (
    Prediction,
    evaluate_predictions,
    memoised,
    score_margins,
)
from simprop.engine.metrics import EpisodeMetrics
from simprop.model.prototypes import average_shots, masked_average_pool, region_is_empty

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps


@dataclass
class PrototypeMatcher:
    """The parameter-free control: per pixel, is the query feature closer (cosine) to the
    supports' foreground prototype than to their background prototype?

    It reads the same frozen layer2 ⊕ layer3 features the networks start from, pools the
    prototypes with the networks' own :func:`~simprop.model.prototypes.masked_average_pool`
    (eq. 1, averaged over the shots as eq. 4), and scores its margin
    ``cos(F_q, Z^f) - cos(F_q, Z^b)`` exactly like a network's logit margin
    (:func:`score_margins`).  A trained network that scores below it has learned nothing
    the features did not already give; one that scores like it with any support has
    learned saliency.  ``backbone``: images [N,3,S,S] -> features, used without a cache.
    """

    store: ImageStore
    device: torch.device
    backbone: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int = 16
    cache: FeatureCache | None = None
    resolution: str = "original"  # scored like the network (evaluate.resolution / evaluate.void)
    void: str = "ignore"
    classes: tuple[int, ...] | None = None

    _memo: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _prototypes: dict[tuple[str, int], tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)
    _queries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def features(self, image_ids: list[str]) -> torch.Tensor:
        """[N,C,h,w] float32 features; each image's are read (or computed) once (:func:`memoised`)."""

        def read(chunk: list[str]) -> torch.Tensor:
            if self.cache is not None:
                return self.cache.get(chunk).to(self.device)
            return self.backbone(torch.stack([self.store.image(i) for i in chunk]).to(self.device)).float()

        return memoised(image_ids, self._memo, self.batch_size, read)

    @torch.no_grad()
    def margins(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Margins [B,1,h,w] of query features [B,C,h,w], supports [B,K,C,h,w], masks [B,K,S,S]."""
        batch, shots = masks.shape[:2]
        direction = prototype_direction(support_prototypes(supports.flatten(0, 1), masks.flatten(0, 1)), shots)
        flat = query.flatten(2)  # [B,C,hw]
        dot = torch.bmm(direction[:, None, :], flat)[:, 0]  # [B,hw]
        return (dot / query_norm(flat)).view(batch, 1, *query.shape[-2:])

    @torch.no_grad()
    def support_prototypes(self, keys: list[tuple[str, int]]) -> tuple[torch.Tensor, ...]:
        """(Z^f [N,C], Z^b [N,C], foreground empty [N], background empty [N]) of the supports
        ``keys`` = (image id, mask class), each pooled once per evaluation: a support's
        prototypes depend on its image and class alone, and a support image appears in many
        episodes (five times over at 5-shot), so pooling once replaces stacking its whole
        feature map into every batch it is in (the matcher's main cost before)."""
        missing = sorted({k for k in keys if k not in self._prototypes})
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            features = self.features([image_id for image_id, _ in chunk])
            masks = torch.stack([support_mask(self.store.input_label(i), c) for i, c in chunk]).to(self.device)
            pooled = support_prototypes(features, masks)
            self._prototypes.update(zip(chunk, zip(*pooled)))
        return tuple(torch.stack(column) for column in zip(*(self._prototypes[k] for k in keys)))

    @torch.no_grad()
    def query(self, image_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat features [C,hw], their per-pixel norms [h,w]) of a query image, computed once."""
        if image_id not in self._queries:
            features = self.features([image_id])  # [1,C,h,w]
            flat = features.flatten(2)
            self._queries[image_id] = (flat[0], query_norm(flat).view(features.shape[-2:]))
        return self._queries[image_id]

    def predict(self, episodes: list[Episode], desc: str = "prototype matcher") -> Iterator[Prediction]:
        for start in tqdm(range(0, len(episodes), self.batch_size), desc=desc, unit="batch", leave=False):
            batch = episodes[start : start + self.batch_size]
            pooled = self.support_prototypes([(s, e.support_mask_class) for e in batch for s in e.supports])
            rows = []
            for d, episode in zip(prototype_direction(pooled, len(batch[0].supports)), batch):
                flat, norm = self.query(episode.query)  # [C] . [C,hw]: one small product per episode
                rows.append((d[None] @ flat).view_as(norm) / norm)
            margins = torch.stack(rows)[:, None]
            yield from score_margins(self.store, batch, margins, resolution=self.resolution, void=self.void)

    def evaluate(self, episodes: list[Episode], desc: str = "prototype matcher") -> EpisodeMetrics:
        return evaluate_predictions(self.predict(episodes, desc=desc), self.classes)


def support_prototypes(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(Z^f, Z^b, foreground empty, background empty) of supports [N,C,h,w] with masks [N,S,S]:
    eq. 1's :func:`~simprop.model.prototypes.masked_average_pool` and which regions are empty."""
    zf, zb = masked_average_pool(features, masks)
    fg_empty, bg_empty = region_is_empty(masks, tuple(features.shape[-2:]))
    return zf, zb, fg_empty, bg_empty


def prototype_direction(pooled: tuple[torch.Tensor, ...], shots: int) -> torch.Tensor:
    """``Z^f/|Z^f| - Z^b/|Z^b|`` [B,C] of each episode's averaged prototypes (eq. 4): ``pooled``
    is :func:`support_prototypes` of the B x ``shots`` supports, episode by episode; supports
    with an empty region are left out of that region's mean.

    cos(F_q, Z^f) - cos(F_q, Z^b) = <F_q/|F_q|, Z^f/|Z^f| - Z^b/|Z^b|>: one pass over the query
    map instead of two broadcast cosine_similarity calls; norms are clamped at 1e-8 as
    torch.nn.functional.cosine_similarity does (an empty region's zero prototype gives 0)."""
    zf, zb, fg_empty, bg_empty = (t.view(-1, shots, *t.shape[1:]) for t in pooled)
    zf, zb = average_shots(zf, fg_empty), average_shots(zb, bg_empty)
    return zf / zf.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS) - zb / zb.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)


def query_norm(flat: torch.Tensor) -> torch.Tensor:
    """Per-pixel feature norms [B,hw] of [B,C,hw], clamped like cosine_similarity (a squared sum:
    several times faster on the CPU than einsum or vector_norm here)."""
    return flat.square().sum(dim=1).sqrt().clamp_min(COSINE_EPS)
