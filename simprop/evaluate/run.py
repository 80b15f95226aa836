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

Every evaluation carries the controls that tell whether a model uses its support
(:func:`evaluate_model`): the parameter-free prototype matcher on the same frozen
features (:class:`PrototypeMatcher`), the trained model with a *mismatched* support
(the episode file's supports of another class of the fold), the identical-input test,
the all-foreground predictor and the untrained network.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from simprop.datasets import (
    DataError,
    DataPaths,
    Episode,
    ImageStore,
    read_episodes,
    read_pairs,
    support_mask,
)
from simprop.features import FeatureCache
from simprop.metrics import EpisodeMetrics, aggregate_seeds, confusion_counts_many, scoring_label
from simprop.model.prototypes import average_shots, masked_average_pool, region_is_empty
from simprop.params import Params, ParamsError
from simprop.precision import autocast
from simprop.voc import fold_classes


class DeviceUnavailable(ParamsError, RuntimeError):
    """A device named in params (or on the command line) that this machine does not have.

    A :class:`~simprop.params.ParamsError`, so a stage reports it as one line and exits 2."""


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; explicit names are honoured (and checked).

    ``key`` names the parameter in the error (e.g. ``train.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"{key}: {name!r} was requested but CUDA is not available on this machine; set {key}: auto (or cpu)"
        )
    return device


@dataclass
class Prediction:
    episode: Episode
    pred: np.ndarray  # bool [H, W] at the scoring size (the original label's, or 321 x 321)
    label: np.ndarray  # uint8 {0, 1, 255} episode label at that size (see simprop.metrics.scoring_label)
    counts: np.ndarray | None = None  # (TP, FP, FN, TN) of pred vs label, when already counted


@dataclass
class EpisodeRunner:
    """Runs a model over episodes with per-image feature memoisation."""

    model: torch.nn.Module
    store: ImageStore
    device: torch.device
    batch_size: int = 16
    cache: FeatureCache | None = None
    amp: bool = False  # evaluate.amp: the network under autocast (simprop.precision)
    resolution: str = "original"  # evaluate.resolution
    void: str = "ignore"  # evaluate.void
    classes: tuple[int, ...] | None = None  # the fold's classes: the mIoU is their mean
    # the model's encoder outputs, precomputed for every cached image (the trainer's
    # simprop.training.EncodedFeatures of a frozen projection: ``get(ids)`` -> [N, C, h, w]);
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
            with autocast(self.device, self.amp):
                logits = self.model(query_encoded=query, support_encoded=supports, support_masks=masks, out_size=(size, size))["query"]
            # argmax over (background, foreground) == (fg - bg) > 0, and bilinear upsampling is
            # linear: upsample the one-channel margin instead of both logits (half the work).
            margins = (logits[:, 1:2] - logits[:, 0:1]).float()
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
    321 x 321; :func:`simprop.metrics.scoring_label`) and thresholded at 0.

    Episodes whose labels share a size are upsampled and counted in one call each (bilinear
    interpolation treats every sample of a batch on its own, so this is the per-episode result,
    bit for bit; the counts are :func:`~simprop.metrics.confusion_counts_many`'s)."""
    labels = [scoring_label(store.label(e.query), e.cls, resolution=resolution, void=void) for e in batch]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for n, label in enumerate(labels):
        by_size.setdefault(label.shape, []).append(n)
    out: list[Prediction | None] = [None] * len(batch)
    for size, rows in by_size.items():
        full = F.interpolate(margins[rows], size=size, mode="bilinear", align_corners=True)
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
    matcher_record: dict | None = None,
) -> tuple[dict, EpisodeRunner]:
    """All test sets and shots, the identical-input test, and the support-use controls.

    Per test set and shot: the model and the prototype matcher; per test set, 1-shot: the
    model with the mismatched support; on the first test set: the all-foreground predictor
    and the untrained network.  ``support_use`` holds the gains the controls are read by:
    ``support_gain`` = 1-shot mIoU - mismatched-support mIoU, ``shot5_gain`` = 5-shot - 1-shot,
    ``identical_gain`` = identical input - 1-shot, ``matcher_gain`` = 1-shot - the matcher's
    1-shot (means over the test sets).  Returns the metrics record (docs/architecture.md,
    percent) and the runner so the caller can draw qualitative examples from its memoised
    features.  ``matcher_record``: the fold's prototype-matcher entries (:func:`evaluate_matcher`)
    when the caller has them already (the matcher has no parameters: every variant of a fold
    gets the same numbers); they are logged like the ones computed here.
    """
    ev = params.evaluate
    paths = DataPaths(root / params.data.root)
    store = ImageStore(paths, ev.image_size)
    scoring = dict(resolution=ev.resolution, void=ev.void, classes=fold_classes(fold))
    runner = EpisodeRunner(model, store, device, ev.batch_size, cache, amp=ev.amp, **scoring)
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
        "iom_iterations": getattr(model, "iom_iterations", 0),
        "miou_classes": "the fold's 5 classes; a class without a defined IoU counts as 0 (classes_scored)",
    }
    started = time.perf_counter()

    def test_set(seed: int, shots: int) -> list[Episode]:
        return read_episodes(paths.episode_file(fold, f"test_seed{seed}"), shots)

    def over_seeds(name: str, evaluate: Callable[[list[Episode], str], EpisodeMetrics], shots: int,
                   episodes_of: Callable[[list[Episode]], list[Episode]] = lambda e: e) -> dict:  # fmt: skip
        return _over_seeds(params, lambda seed: episodes_of(test_set(seed, shots)), evaluate, name,
                           f"{variant} fold{fold}", log)  # fmt: skip

    for shots in ev.shots:
        record[f"shot{shots}"] = over_seeds(f"shot{shots}", runner.evaluate, shots)
    record["mismatched"] = over_seeds("mismatched", runner.evaluate, 1, lambda eps: mismatched_episodes(eps, 1))
    if matcher_record is None:
        matcher_record = evaluate_matcher(params, fold, root, device, cache, model.backbone_features)
    record["matcher"] = matcher_record
    if log is not None:  # the run of every variant carries the matcher's per-seed numbers
        for k, entry in matcher_record.items():
            for seed in params.episodes.test_seeds:
                log(seed_metrics(f"matcher_{k}", seed, entry[f"seed{seed}"]))
    if ev.identical_input:
        pairs = read_pairs(paths.split(fold, "test"))
        summary = runner.evaluate(identical_input_episodes(pairs), desc="identical input").summary()
        record["identical"] = {"miou": summary["miou"], "fbiou": summary["fbiou"], "class_iou": summary["class_iou"],
                               "classes_scored": summary["classes_scored"]}  # fmt: skip
    first = test_set(params.episodes.test_seeds[0], 1)
    reference = {"all_foreground_miou": all_foreground_metrics(store, first, **scoring).summary()["miou"]}
    if untrained is not None:
        baseline = EpisodeRunner(untrained, store, device, ev.batch_size, cache, amp=ev.amp, **scoring)
        reference["untrained_miou"] = baseline.evaluate(first, desc="untrained").summary()["miou"]
    record["reference"] = reference
    record["support_use"] = support_use(record)
    record["feature_computations"] = runner.feature_computations
    record["wall_time_s"] = round(time.perf_counter() - started, 2)
    return record, runner


def _over_seeds(params: Params, episodes_of: Callable[[int], list[Episode]],
                evaluate: Callable[[list[Episode], str], EpisodeMetrics], name: str, label: str, log=None) -> dict:  # fmt: skip
    """One entry of an evaluation record: ``evaluate`` on every test set, per seed and aggregated."""
    entry, per_seed = {}, []
    for seed in params.episodes.test_seeds:
        summary = evaluate(episodes_of(seed), f"{label} {name} seed{seed}").summary()
        entry[f"seed{seed}"] = summary
        per_seed.append(summary)
        if log is not None:
            log(seed_metrics(name, seed, summary))
    entry.update(aggregate_seeds(per_seed))
    return entry


def seed_metrics(name: str, seed: int, summary: dict) -> dict:
    """The MLflow metrics of one test set's summary: ``<name>_seed<s>_miou`` / ``_fbiou``."""
    return {f"{name}_seed{seed}_miou": summary["miou"], f"{name}_seed{seed}_fbiou": summary["fbiou"]}


def evaluate_matcher(params: Params, fold: int, root: Path, device: torch.device, cache: FeatureCache | None,
                     backbone_features: Callable) -> dict:  # fmt: skip
    """The parameter-free prototype matcher on every test set and shot of ``fold``: the
    ``matcher`` entry of an evaluation record (``{"shot1": ..., "shot5": ...}``).  It reads the
    frozen backbone's features only, so it is the same for every variant of the fold."""
    ev = params.evaluate
    paths = DataPaths(root / params.data.root)
    store = ImageStore(paths, ev.image_size)
    matcher = PrototypeMatcher(store, device, backbone_features, ev.batch_size, cache,
                               resolution=ev.resolution, void=ev.void, classes=fold_classes(fold))  # fmt: skip
    return {
        f"shot{k}": _over_seeds(
            params, lambda seed, k=k: read_episodes(paths.episode_file(fold, f"test_seed{seed}"), k),
            matcher.evaluate, f"matcher_shot{k}", f"fold{fold}",
        )
        for k in ev.shots
    }  # fmt: skip


def mismatched_episodes(episodes: list[Episode], shots: int) -> list[Episode]:
    """The same queries with ``shots`` supports of another class (episode files' mismatch columns)."""
    if episodes and episodes[0].mismatch_class is None:
        raise DataError(
            "the episode files have no mismatched-support columns (written by an older episodes "
            "stage); rerun `dvc repro episodes`"
        )
    return [e.mismatched(shots) for e in episodes]


def support_use(record: dict) -> dict:
    """The support-use gains of an evaluation record (percentage points; None where not run)."""
    one = record.get("shot1", {}).get("miou_mean")

    def minus(a, b):
        return None if a is None or b is None else a - b

    return {
        "support_gain": minus(one, record.get("mismatched", {}).get("miou_mean")),
        "shot5_gain": minus(record.get("shot5", {}).get("miou_mean"), one),
        "identical_gain": minus(record.get("identical", {}).get("miou"), one),
        "matcher_gain": minus(one, record.get("matcher", {}).get("shot1", {}).get("miou_mean")),
    }


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


def evaluate_fold_variants(params: Params, variants: list[str], fold: int, root: Path | str = ".") -> list[dict]:
    """The ``evaluate`` stage's job for one fold: every variant of ``variants`` in turn, each in
    its own MLflow run (:func:`evaluate_fold`); the prototype matcher, which has no parameters,
    is scored once for the fold and its numbers go into every variant's record and run.
    Module-level so that :func:`simprop.parallel.run_folds` can run it in a worker process."""
    records, matcher = [], None
    for variant in variants:
        records.append(evaluate_fold(params, variant, fold, root, matcher_record=matcher))
        matcher = records[-1]["matcher"]
    return records


def evaluate_fold(params: Params, variant: str, fold: int, root: Path | str = ".",
                  matcher_record: dict | None = None) -> dict:  # fmt: skip
    """One (variant, fold) evaluation of the ``evaluate`` stage, in its own MLflow run.

    Scores the selected checkpoint (``models/<variant>/fold<i>/best.pt``) on every test set and
    shot count with the support-use controls (:func:`evaluate_model`); writes
    ``metrics/evaluate/<variant>/fold<i>.json`` and ``outputs/evaluate/<variant>/fold<i>/qualitative.png``.
    ``matcher_record``: the fold's matcher entries when an earlier variant of the fold scored them
    (:func:`evaluate_fold_variants`), else they are scored here.
    """
    from simprop.features import open_feature_cache
    from simprop.model import build_model, expected_identity, load_checkpoint
    from simprop.tracking import stage_run
    from simprop.training import TrainPaths
    from simprop.visualize import save_qualitative

    root = Path(root)
    device = resolve_device(params.evaluate.device, "evaluate.device")
    paths = TrainPaths(root, variant, fold)
    untrained = build_model(variant, params.model, init_seed=params.train.seed).to(device).eval()
    # the checkpoint must be this stage's: variant, fold, protocol, backbone and fold lists
    # (not the training code's digest: see simprop/model/checkpoint.py)
    expected = expected_identity(params, variant, fold, root, untrained.backbone.checksum())
    model, meta = load_checkpoint(paths.best, map_location=device, expected=expected)
    cache = open_feature_cache(params, root, params.evaluate.image_size, model.backbone.checksum())
    out = root / "metrics" / "evaluate" / variant / f"fold{fold}.json"
    figure = root / "outputs" / "evaluate" / variant / f"fold{fold}" / "qualitative.png"
    shots = ",".join(str(s) for s in params.evaluate.shots)
    with stage_run("evaluate", params, variant=variant, fold=fold, shots=shots) as run:
        run.set_tags({"checkpoint_epoch": meta.get("epoch"), "checkpoint_val_miou": meta.get("val_miou"),
                      "torch_threads": torch.get_num_threads()})  # fmt: skip
        record, runner = evaluate_model(params, model, variant, fold, root, device, cache, untrained=untrained,
                                        log=run.log_metrics, matcher_record=matcher_record)  # fmt: skip
        record["checkpoint"] = {"epoch": meta.get("epoch"), "val_miou": meta.get("val_miou")}
        write_json(out, record)
        rows = qualitative_rows(params, runner, fold, root, params.report.num_qualitative)
        if rows:
            save_qualitative(rows, figure, title=f"{variant}, {params.splits.protocol} fold {fold}, 1-shot")
        else:
            figure.parent.mkdir(parents=True, exist_ok=True)
        for shot in params.evaluate.shots:
            entry = record[f"shot{shot}"]
            run.log_metrics({f"shot{shot}_miou_mean": entry["miou_mean"], f"shot{shot}_miou_std": entry["miou_std"],
                             f"shot{shot}_fbiou_mean": entry["fbiou_mean"],
                             f"shot{shot}_classes_scored": entry["classes_scored"]})  # fmt: skip
        if "identical" in record:
            run.log_metrics({"identical_miou": record["identical"]["miou"]})
        run.log_metrics({"mismatched_miou_mean": record["mismatched"]["miou_mean"],
                         **{f"matcher_{k}_miou_mean": v["miou_mean"] for k, v in record["matcher"].items()},
                         **record["support_use"]})  # fmt: skip
        run.log_metrics({k: v for k, v in record["reference"].items() if v is not None})
        run.log_artifact(out)
        if figure.is_file():
            run.log_artifact(figure)
    summary = ", ".join(f"{s}-shot mIoU {record[f'shot{s}']['miou_mean']:.2f}" for s in params.evaluate.shots)
    print(f"{variant} fold {fold}: {summary}", flush=True)
    return record
