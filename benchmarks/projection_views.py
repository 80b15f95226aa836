"""How much of the prototype matcher's signal survives the encoder projection's view of the features?

The parameter-free prototype matcher (``simprop.evaluation.PrototypeMatcher``) reads all 1536
frozen backbone channels; a network reads them through its projection (3 x 3 conv 1536 ->
``model.channels``, ReLU). This scores the same matcher on the validation episodes (1-shot,
``episodes.val_seed``; test episodes are never read) through several views of the cached features:

- ``all 1536 channels``: the matcher of the evaluate stage;
- ``default init``: the projection as ``nn.Conv2d`` initialises it (seed ``train.seed``);
- ``pca init``: the projection after :func:`simprop.training.pca_projection_init`;
- ``trained <variant>``: the projection of ``models/<variant>/fold<k>/best.pt`` where present.

Run after ``dvc repro features episodes`` (and ``train`` for the trained rows):

    python3 benchmarks/projection_views.py [--folds 0 1 2 3] [--out views.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simprop.datasets import DataPaths, ImageStore, read_episodes  # noqa: E402
from simprop.evaluation import PrototypeMatcher  # noqa: E402
from simprop.model import load_checkpoint  # noqa: E402
from simprop.params import load_params  # noqa: E402
from simprop.training import Trainer, feature_moments, pca_projection_init  # noqa: E402


class ProjectedCache:
    """The feature cache seen through ``view`` (what the matcher reads instead of the raw features)."""

    def __init__(self, cache, view) -> None:
        self.cache, self.view = cache, view

    @torch.no_grad()
    def get(self, image_ids: list[str], gray: bool = False) -> torch.Tensor:
        return self.view(self.cache.get(image_ids, gray=gray).float())


def fold_views(fold: int) -> dict[str, float]:
    params = load_params(ROOT / "params.yaml")
    default = dataclasses.replace(params, train=dataclasses.replace(params.train, projection_init="default"))
    trainer = Trainer(default, params.train.variants[0], fold, ROOT)  # its cache, training pairs, seeded init
    pca = copy.deepcopy(trainer.model.projection)
    pca_projection_init(pca, *feature_moments(trainer._feature_rows()))
    views = {"all 1536 channels": lambda f: f, "default init": trainer.model.projection.conv_relu,
             "pca init": pca.conv_relu}  # fmt: skip
    for variant in params.train.variants:
        checkpoint = ROOT / "models" / variant / f"fold{fold}" / "best.pt"
        if checkpoint.is_file():
            model, _ = load_checkpoint(checkpoint, map_location="cpu")
            views[f"trained {variant}"] = model.projection.conv_relu
    paths = DataPaths(ROOT / params.data.root)
    store = ImageStore(paths, params.evaluate.image_size)
    episodes = read_episodes(paths.val_episode_file(fold), 1)
    scores = {}
    for name, view in views.items():
        matcher = PrototypeMatcher(store, torch.device("cpu"), None, 64, ProjectedCache(trainer.cache, view))
        scores[name] = round(float(matcher.evaluate(episodes).summary()["miou"]), 2)
        print(f"fold {fold}  {name:24s} {scores[name]:6.2f}", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {f"fold{k}": fold_views(k) for k in args.folds}
    names = list(next(iter(result.values())))
    print("| view | " + " | ".join(result) + " | mean |\n|---|" + "---|" * (len(result) + 1))
    for name in names:
        values = [result[f][name] for f in result if name in result[f]]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values) / len(values):.1f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
