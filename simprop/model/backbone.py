"""The ``backbone`` stage: materialise the frozen ResNet-50 weights every later stage uses.

``backbone.source``:

* ``imagenet`` (paper setup): torchvision's ImageNet weights, fetched once and
  saved as a local file so every stage (and every re-run) uses identical weights.
* ``random`` (default CPU setup, where ImageNet weights cannot be downloaded):
  seeded random weights whose BatchNorm statistics are calibrated on
  ``backbone.calibration_images`` training-pool images.  Uncalibrated random
  BatchNorm statistics make layer3 features carry no signal (a cosine probe of
  the support prototype separates foreground from background at chance level);
  calibrated ones keep colour and texture information, which is what a
  stand-in for a pretrained encoder needs.  Only training-pool images are used,
  never the test pool.  ``backbone.residual_scale`` multiplies the last
  BatchNorm weight of every bottleneck (the residual branch), as zero- or
  small-init residual schemes do: with full-size random branches, thirteen
  stacked random blocks wash the input out (on the generated data a
  support-prototype cosine classifier on layer2 ⊕ layer3 does no better than the
  all-foreground predictor); with 0.1 the identity paths carry the information
  through (the probe's numbers: docs/performance.md, "Measurements behind code
  choices").
* a path: a torchvision ResNet-50 state dict, validated and copied.

The result is a plain torchvision-style state dict of ``conv1 .. layer3`` at
``backbone.path`` plus ``<path>.json`` provenance; ``model.backbone_weights``
points at that file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from tqdm import tqdm

from simprop.data.datasets import DataPaths, ImageStore, read_pairs
from simprop.infra import atomic
from simprop.model.encoder import Backbone, build_backbone
from simprop.model.resnet import Bottleneck
from simprop.params import Params


@torch.no_grad()
def calibrate_batchnorm(backbone: Backbone, images: list[torch.Tensor], batch_size: int = 16) -> None:
    """Replace every BatchNorm's running mean/var by its exact average over ``images``."""
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average = plain mean over the batches
        norm.training = True
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="BatchNorm calibration", unit="batch"):
            backbone(torch.stack(images[start : start + batch_size]))
    finally:
        for norm in norms:
            norm.training = False
            norm.momentum = 0.1


@torch.no_grad()
def scale_residual_branches(backbone: Backbone, scale: float) -> None:
    """Multiply each bottleneck's last BatchNorm weight (its residual branch) by ``scale``;
    the shortcut (identity or downsample) is untouched."""
    for block in backbone.modules():
        if isinstance(block, Bottleneck):
            block.bn3.weight.mul_(scale)


def calibration_ids(params: Params, root: Path) -> list[str]:
    """Training-pool images (union of the folds' training lists), a seeded sample."""
    paths = DataPaths(root / params.data.root)
    ids = sorted({image for fold in params.splits.folds for image, _ in read_pairs(paths.split(fold, "train"))})
    generator = torch.Generator().manual_seed(params.backbone.seed)
    order = torch.randperm(len(ids), generator=generator).tolist()
    return [ids[i] for i in order[: params.backbone.calibration_images]]


def materialise_backbone(params: Params, root: Path) -> dict:
    """Write ``backbone.path`` (+ provenance json) atomically; returns the provenance."""
    cfg = params.backbone
    out = root / cfg.path
    provenance: dict = {"source": cfg.source}
    if cfg.source == "random":
        backbone = build_backbone("none", cfg.seed)
        scale_residual_branches(backbone, cfg.residual_scale)
        ids = calibration_ids(params, root)
        store = ImageStore(DataPaths(root / params.data.root), params.train.image_size, memoise=False)
        calibrate_batchnorm(backbone, [store.image(i) for i in ids])
        provenance.update(
            seed=cfg.seed,
            residual_scale=cfg.residual_scale,
            calibration_images=len(ids),
            calibration_size=params.train.image_size,
        )
    else:
        backbone = build_backbone(cfg.source, cfg.seed)  # imagenet or a file; errors explain what to do
    provenance["sha256"] = backbone.checksum()
    buffer = io.BytesIO()
    torch.save(backbone.state_dict(), buffer)
    atomic.write_bytes(out, buffer.getvalue())
    atomic.write_text(out.with_name(out.name + ".json"), json.dumps(provenance, indent=1) + "\n")
    return provenance
