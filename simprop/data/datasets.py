"""Loading images, labels, split lists and episode files for training and evaluation.

The data stages (:mod:`simprop.data`) write plain files; this module turns them
into normalised tensors.  Labels follow protocol.md §4: for target class ``c``
foreground is ``label == c``, 255 is ignored, everything else is background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# file readers shared with the data stages (each error names the file), re-exported for callers
from simprop.data.io import Episode, read_episodes, read_label, read_pairs  # noqa: F401
from simprop.data.io import load_image as read_image  # noqa: F401
from simprop.data.layout import DataLayout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


class DataPaths(DataLayout):
    """The data contract (docs/architecture.md) as the training and evaluation code reads it."""

    def split(self, fold: int, name: str) -> Path:
        """``splits/fold<i>/<name>.csv`` (name: train, val or test)."""
        return self.split_file(fold, name)

    def episode_file(self, fold: int, name: str) -> Path:
        """``episodes/fold<i>/<name>.csv`` (name: ``test_seed<s>``); validation episodes live in
        their own tree (:meth:`val_episode_file`)."""
        return self.episodes / f"fold{fold}" / f"{name}.csv"

    @property
    def features(self) -> Path:
        return self.root / "features"


# --------------------------------------------------------------------------- tensors


def normalise(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] with ImageNet mean/std."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> [3, size, size] (bilinear), as CANet feeds square inputs."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=True)[0]


def resize_label(label: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """[H, W] class indices -> [size, size] (nearest; never blends class ids)."""
    t = label.to(torch.uint8) if isinstance(label, torch.Tensor) else torch.tensor(np.asarray(label), dtype=torch.uint8)
    return F.interpolate(t[None, None].float(), size=(size, size), mode="nearest")[0, 0].to(torch.uint8)


def binary_target(label: torch.Tensor, cls: int) -> torch.Tensor:
    """Class-index label -> {0, 1, 255} long target for class ``cls``."""
    target = (label == cls).long()
    target[label == IGNORE_INDEX] = IGNORE_INDEX
    return target


def support_mask(label: torch.Tensor, cls: int) -> torch.Tensor:
    """Class-index label -> float {0, 1} mask (void pixels are not foreground)."""
    return (label == cls).float()


class ImageStore:
    """Loads (and memoises) images resized to the network input and labels at full size.

    Memoisation keeps each image decoded once per process; the default synthetic
    dataset is small, and the paper setup uses DataLoader workers instead.
    """

    def __init__(self, paths: DataPaths, image_size: int, memoise: bool = True):
        self.paths = paths
        self.image_size = image_size
        self.memoise = memoise
        self._images: dict[str, torch.Tensor] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._input_labels: dict[str, torch.Tensor] = {}

    def image(self, image_id: str) -> torch.Tensor:
        """The normalised network input [3, S, S]; memoised as uint8 (a quarter of float32's memory)."""
        resized = self._images.get(image_id)
        if resized is None:
            rgb = torch.from_numpy(read_image(self.paths.image(image_id))).permute(2, 0, 1).float()
            resized = resize_image(rgb, self.image_size).round().clamp(0, 255).to(torch.uint8)
            if self.memoise:
                self._images[image_id] = resized
        return normalise(resized.permute(1, 2, 0).numpy())

    def label(self, image_id: str) -> np.ndarray:
        """The full-resolution class-index label."""
        if image_id in self._labels:
            return self._labels[image_id]
        label = read_label(self.paths.label(image_id))
        if self.memoise:
            self._labels[image_id] = label
        return label

    def input_label(self, image_id: str) -> torch.Tensor:
        """The label resized (nearest) to the network input, [S, S] uint8; memoised.

        Support masks and training targets are made from it for every episode and step an
        image appears in; resizing once per image instead of once per use.
        """
        resized = self._input_labels.get(image_id)
        if resized is None:
            resized = resize_label(self.label(image_id), self.image_size)
            if self.memoise:
                self._input_labels[image_id] = resized
        return resized

    def raw_image(self, image_id: str) -> np.ndarray:
        return read_image(self.paths.image(image_id))


def augment_support(
    image: torch.Tensor, label: torch.Tensor, scale_min: float, scale_max: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CANet's support augmentation: random scale, random crop back to size, horizontal flip."""
    size = image.shape[-1]
    scale = float(rng.uniform(scale_min, scale_max))
    new = max(size, int(round(size * scale)))
    if new > size:
        image = F.interpolate(image[None], size=(new, new), mode="bilinear", align_corners=True)[0]
        label = F.interpolate(label[None, None].float(), size=(new, new), mode="nearest")[0, 0].to(torch.uint8)
        top = int(rng.integers(0, new - size + 1))
        left = int(rng.integers(0, new - size + 1))
        image = image[:, top : top + size, left : left + size]
        label = label[top : top + size, left : left + size]
    if rng.random() < 0.5:
        image = image.flip(-1)
        label = label.flip(-1)
    return image.contiguous(), label.contiguous()
