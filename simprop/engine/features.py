"""A cache of frozen backbone features, computed once per image for every stage.

The ResNet-50 layers are frozen (paper §3.2), so their output depends only on the
image, the weights and the input size.  When training runs without image
augmentation (the CPU default setup) every train and evaluate stage would
otherwise recompute the same features; the ``features`` stage computes them once
and stores them as memory-mapped ``.npy`` arrays that all stages share through
the page cache.  Channel-averaged (ICA) query images get their own array.

With augmentation on (the paper setup) the cache is disabled and the stage
writes only a manifest saying so.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from simprop.data.datasets import DataPaths, ImageStore, read_pairs
from simprop.errors import DataError, DiskFullError
from simprop.infra.atomic import LOW_SPACE_BYTES, disk_full_error, free_bytes, is_disk_full, size_of
from simprop.model import VARIANTS as VARIANT_SPECS
from simprop.model import build_model
from simprop.model.ica import apply_input_channel_averaging
from simprop.params import Params

MANIFEST = "manifest.json"


LAYOUT = "NHWC"  # rows are [h, w, C]: a batch is a channels-last tensor without a copy


@dataclass
class FeatureCache:
    """Read-only view of the cached features: ``cache.get(ids, gray=False)`` -> tensor.

    ``color`` / ``gray`` rows are stored [h, w, C] (:data:`LAYOUT`); :meth:`get` returns the
    usual [N, C, h, w] shape in channels-last memory, so the encoder conv
    (:mod:`simprop.model.shifted_gemm`) reads the pixels as a matrix without copying them.
    """

    index: dict[str, int]
    color: np.ndarray
    gray: np.ndarray | None

    def get(self, image_ids: list[str], gray: bool = False) -> torch.Tensor:
        table = self.gray if gray else self.color
        if table is None:
            raise DataError("the feature cache has no channel-averaged (ICA) features; rerun dvc repro features")
        rows = cache_rows(self.index, image_ids)
        # torch's fp16 -> fp32 conversion is exact and faster than numpy's astype here (docs/performance.md)
        return torch.from_numpy(np.stack([table[r] for r in rows])).float().permute(0, 3, 1, 2)


def cache_rows(index: dict[str, int], image_ids: list[str]) -> list[int]:
    """The cache rows of ``image_ids`` (a clear error for an image the cache does not hold)."""
    try:
        return [index[i] for i in image_ids]
    except KeyError as exc:
        raise DataError(f"image {exc} is not in the feature cache; rerun dvc repro features") from None


def cache_dir(params: Params, root: Path) -> Path:
    return DataPaths(root / params.data.root).features


def needs_gray(params: Params) -> bool:

    return any(VARIANT_SPECS[v].ica for v in params.train.variants)


def all_image_ids(params: Params, root: Path) -> list[str]:
    """Every image of every split list of the configured folds, sorted (stable order)."""
    paths = DataPaths(root / params.data.root)
    ids: set[str] = set()
    for fold in params.splits.folds:
        for name in ("train", "val", "test"):
            ids.update(image for image, _ in read_pairs(paths.split(fold, name)))
    return sorted(ids)


def build_feature_cache(params: Params, root: Path, device: torch.device, batch_size: int = 16) -> dict:
    """Compute and store the cache (or a disabled manifest); returns the manifest.

    Written into ``<features>.tmp`` and renamed into place when complete; on any failure the
    temporary folder is removed and an existing cache is left as it was.
    """
    out = cache_dir(params, root)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest: dict = {
        "enabled": params.train.cache_backbone_features,
        "image_size": params.train.image_size,
        "backbone_weights": params.model.backbone_weights,
        "backbone_seed": params.model.backbone_seed,
        "layout": LAYOUT,
    }
    try:
        if params.train.cache_backbone_features:

            model = build_model("canet", params.model).to(device).eval()
            ids = all_image_ids(params, root)
            store = ImageStore(DataPaths(root / params.data.root), params.train.image_size, memoise=False)
            with_gray = needs_gray(params)
            color = gray = None
            for start in tqdm(range(0, len(ids), batch_size), desc="backbone features", unit="batch"):
                batch = torch.stack([store.image(i) for i in ids[start : start + batch_size]]).to(device)
                feats = _rows(model.backbone_features(batch))
                if color is None:
                    shape = (len(ids), *feats.shape[1:])
                    # a memory-mapped write into a full file system is a SIGBUS, not an error: check first
                    need = (2 if with_gray else 1) * int(np.prod(shape)) * np.dtype(np.float16).itemsize
                    if 0 <= free_bytes(tmp / "color.npy") < need + LOW_SPACE_BYTES:
                        raise disk_full_error(out, need)
                    color = np.lib.format.open_memmap(tmp / "color.npy", mode="w+", dtype=np.float16, shape=shape)
                    if with_gray:
                        gray = np.lib.format.open_memmap(tmp / "gray.npy", mode="w+", dtype=np.float16, shape=shape)
                color[start : start + len(feats)] = feats
                if gray is not None:
                    averaged = apply_input_channel_averaging(batch, p=1.0)
                    gray[start : start + len(feats)] = _rows(model.backbone_features(averaged))
            for table in (color, gray):
                if table is not None:
                    table.flush()
            manifest.update(
                images=ids,
                feature_shape=[color.shape[3], *color.shape[1:3]] if color is not None else None,  # [C, h, w]
                backbone_checksum=model.backbone.checksum(),
                gray=with_gray,
            )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException as exc:  # an unreadable image, Ctrl-C, SIGTERM: no half-written cache left behind
        written = size_of(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(out, exc):
            raise disk_full_error(out, written) from None
        raise
    return manifest


def _rows(features: torch.Tensor) -> np.ndarray:
    """Backbone features [N, C, h, w] as float16 cache rows [N, h, w, C]."""
    return features.permute(0, 2, 3, 1).cpu().numpy().astype(np.float16)


def open_feature_cache(params: Params, root: Path, image_size: int, backbone_checksum: str) -> FeatureCache | None:
    """The cache when it exists and matches this model and input size, else ``None``."""
    directory = cache_dir(params, root)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("enabled") or manifest.get("image_size") != image_size:
        return None
    if manifest.get("layout") != LAYOUT:
        raise DataError(f"{directory}: cached features are in an older layout; rerun dvc repro features")
    if manifest.get("backbone_checksum") != backbone_checksum:
        raise DataError(
            f"{directory}: cached features were computed with another backbone; rerun dvc repro features"
        )
    color = np.load(directory / "color.npy", mmap_mode="r")
    gray = np.load(directory / "gray.npy", mmap_mode="r") if manifest.get("gray") else None
    return FeatureCache({i: n for n, i in enumerate(manifest["images"])}, color, gray)
