"""The training samples of an epoch: which pair each sample is, its support, augmentation and ICA
switch, all drawn from generators keyed by ``(train.seed, epoch, sample)``, so a sample is the
same whichever process builds it (and after a resume); and CANet's IOM history of every pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from simprop.data.datasets import (
    ImageStore,
    augment_support,
    binary_target,
    read_pairs,
)
from simprop.engine.encoded import EncodedFeatures
from simprop.engine.features import FeatureCache
from simprop.model.ica import apply_input_channel_averaging
from simprop.params import Params


def epoch_order(seed: int, epoch: int, num_pairs: int, needed: int) -> np.ndarray:
    """Which training pair each of the epoch's ``needed`` samples is (repeating the permutation)."""
    return np.resize(np.random.default_rng([seed, epoch]).permutation(num_pairs), needed)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``epoch``: support choice, augmentation, ICA."""
    return np.random.default_rng([seed, epoch, index])


def dropout_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.default_rng([seed, epoch, 2**31 + rank]).integers(0, 2**62))


class IOMHistory:
    """CANet's IOM history in training: the last predicted probabilities of every training pair.

    CaNet's ``dataset_mask_train.py`` keeps ``history_mask_list[index]`` per (image, class)
    training pair; ``train.py`` writes the softmax of the prediction (at the feature size) back
    after every step, and the next time the pair is drawn the dataset returns it with
    probability ``1 - prob`` (``-prob 0.7``), zeros otherwise and zeros before its first visit.
    Stored as float16 [pairs, 2, h, w]; allocated at the first update (h, w = feature size).
    """

    def __init__(self, num_pairs: int) -> None:
        self.num_pairs = num_pairs
        self.table: torch.Tensor | None = None
        self.seen = torch.zeros(num_pairs, dtype=torch.bool)

    def history(self, pairs: list[int], feed: list[bool], device: torch.device) -> torch.Tensor | None:
        """The history input of a batch: the stored prediction where fed and seen, else zeros."""
        if self.table is None:
            return None
        index = torch.tensor(pairs, dtype=torch.long)
        keep = torch.tensor(feed, dtype=torch.bool) & self.seen[index]
        return (self.table[index].float() * keep[:, None, None, None]).to(device)

    def update(self, pairs: torch.Tensor, probs: torch.Tensor) -> None:
        probs = probs.detach().to("cpu", torch.float16)
        if self.table is None:
            self.table = torch.zeros(self.num_pairs, *probs.shape[1:], dtype=torch.float16)
        index = pairs.to("cpu", torch.long)
        self.table[index] = probs
        self.seen[index] = True

    def state_dict(self) -> dict:
        return {"table": self.table, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.table, self.seen = state["table"], state["seen"]


class TrainingPairs:
    """The fold's training (image, class) pairs, and the images of each class (the supports)."""

    def __init__(self, split_file: Path) -> None:
        self.pairs = read_pairs(split_file)
        self.by_class: dict[int, list[str]] = {}
        for image, cls in self.pairs:
            self.by_class.setdefault(cls, []).append(image)
        for cls, images in sorted(self.by_class.items()):
            if len(set(images)) < 2:
                raise RuntimeError(
                    f"{split_file}: class {cls} has fewer than 2 images, so no support "
                    "different from the query exists; use more data or a looser small-object filter"
                )

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class BatchBuilder:
    """The tensors of a training batch: query and support inputs (images, cached backbone features
    or the frozen projection's outputs), their labels, support masks and the IOM history."""

    params: Params
    pairs: TrainingPairs
    store: ImageStore
    device: torch.device
    ica: bool  # the variant trains with ICA
    iom: IOMHistory | None = None
    cache: FeatureCache | None = None
    encoded: EncodedFeatures | None = None
    _targets: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def build(self, epoch: int, indices: list[int], pair_ids: list[int], p_ica: float) -> dict:
        """The tensors of the samples of training pairs ``pair_ids`` (global sample numbers ``indices`` of ``epoch``).

        Every random choice of a sample (its support, augmentation and ICA switch) comes from
        :func:`sample_rng`, so a sample is the same whichever process builds it.
        """
        tp = self.params.train
        support_ids, q_targets, s_targets, s_images, gray, feed_history = [], [], [], [], [], []
        items = [self.pairs.pairs[i] for i in pair_ids]
        # 1. per sample: its support, augmentation, ICA switch and IOM feed, from its own generator
        for index, (query, cls) in zip(indices, items):
            rng = sample_rng(tp.seed, epoch, index)
            candidates = [i for i in self.pairs.by_class[cls] if i != query]
            support = candidates[int(rng.integers(len(candidates)))]
            support_ids.append(support)
            gray.append(bool(self.ica and p_ica > 0 and rng.random() < p_ica))
            q_targets.append(self.target(query, cls))
            if tp.augment:
                s_image, s_label = augment_support(
                    self.store.image(support), self.store.input_label(support), tp.scale_min, tp.scale_max, rng
                )
                s_images.append(s_image)
                s_targets.append(binary_target(s_label, cls).to(torch.uint8))
            else:
                s_targets.append(self.target(support, cls))
            feed_history.append(bool(self.iom is not None and rng.random() < tp.iom_history_p))
        # 2. labels and masks
        query_ids = [q for q, _ in items]
        gray = torch.tensor(gray, dtype=torch.bool)
        s_targets = torch.stack(s_targets)[:, None]
        batch = {
            "query_labels": torch.stack(q_targets).long().to(self.device),
            "support_labels": s_targets.long().to(self.device),
            # support_mask(): the class's pixels; void (255) is not foreground
            "support_masks": (s_targets == 1).float().to(self.device),
            "ica_fraction": float(gray.float().mean()),
            "pair_ids": torch.tensor(pair_ids, dtype=torch.long),
        }
        if self.iom is not None:
            batch["query_history"] = self.iom.history(pair_ids, feed_history, self.device)
        # 3. the inputs: the frozen projection's outputs, cached backbone features, or images
        features = self.encoded if self.encoded is not None else self.cache
        if features is not None:
            color = features.get(query_ids)
            if gray.any():  # the channel-averaged features of the ICA queries only
                color[gray] = features.get([q for q, g in zip(query_ids, gray.tolist()) if g], gray=True)
            kind = "encoded" if self.encoded is not None else "feats"
            batch[f"query_{kind}"] = color.to(self.device)
            batch[f"support_{kind}"] = features.get(support_ids)[:, None].to(self.device)
        else:
            queries = torch.stack([self.store.image(q) for q in query_ids])
            if gray.any():
                queries[gray] = apply_input_channel_averaging(queries[gray], p=1.0)
            batch["query_img"] = queries.to(self.device)
            supports = s_images if tp.augment else [self.store.image(s) for s in support_ids]
            batch["support_imgs"] = torch.stack(supports)[:, None].to(self.device)
        return batch

    def target(self, image_id: str, cls: int) -> torch.Tensor:
        """:func:`binary_target` of an unaugmented image for ``cls`` as uint8 {0, 1, 255}.

        With the feature cache (small inputs; an image is a query or support in many steps of a
        training) it is made once per (image, class) and kept; without it (the paper setup:
        321 px, ~11k training pairs) it is made per use, so the trainer does not hold another
        copy of the labels beside the images it already memoises.
        """
        key = (image_id, cls)
        target = self._targets.get(key)
        if target is None:
            target = binary_target(self.store.input_label(image_id), cls).to(torch.uint8)
            if self.cache is not None:
                self._targets[key] = target
        return target
