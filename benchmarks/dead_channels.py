"""How many of the encoder projection's channels are alive in trained checkpoints.

A channel is dead when its ReLU output is zero on every pixel of every probe image: it then
passes no gradient and carries nothing to the rest of the network. The probe images are the
first ``--images`` rows of the feature cache (``data/features``, the default setup's frozen
backbone features), run through each checkpoint's projection in eval mode (dropout off).

    python3 benchmarks/dead_channels.py [--models models] [--images 100] [--out FILE.md]

Prints (and with ``--out`` writes) a markdown table: alive channels per (variant, fold).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simprop.model import load_checkpoint  # noqa: E402
from simprop.params import VARIANTS, load_params  # noqa: E402


def alive_channels(model, features: torch.Tensor, threshold: float = 0.0) -> tuple[int, int]:
    """(alive, total): channels whose projection output (conv and ReLU, no dropout) is > 0
    somewhere on ``features``."""
    with torch.no_grad():
        out = model.projection.conv_relu(features)
    active = (out > threshold).flatten(2).any(dim=2).any(dim=0)
    return int(active.sum()), int(active.numel())


def probe_features(path: Path, images: int) -> torch.Tensor:
    """The first ``images`` rows of a feature-cache array ([h, w, C] fp16) as [N, C, h, w] float32."""
    rows = np.load(path, mmap_mode="r")[:images]
    return torch.from_numpy(np.asarray(rows, dtype=np.float32)).permute(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--features", type=Path, default=REPO / "data" / "features" / "color.npy")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.features.is_file():
        parser.error(f"{args.features}: no feature cache; run `dvc repro features` first")
    features = probe_features(args.features, args.images)
    folds = load_params(REPO / "params.yaml").train.folds
    lines = ["| variant | " + " | ".join(f"fold {f}" for f in folds) + " |", "|---|" + "---|" * len(folds)]
    for variant in VARIANTS:
        cells = []
        for fold in folds:
            path = args.models / variant / f"fold{fold}" / "best.pt"
            if not path.is_file():
                cells.append("—")
                continue
            model, _ = load_checkpoint(path, map_location="cpu")
            alive, total = alive_channels(model, features)
            cells.append(f"{alive} / {total}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
