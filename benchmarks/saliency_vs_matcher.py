"""Does the generated data reward saliency?  The all-objects predictor vs the prototype matcher.

On the validation episodes of each fold (1-shot, ``data/episodes/fold<i>/val.csv``) of a repository
whose data stages and ``backbone``/``features`` stages have run (``dvc repro features episodes``):

* *all objects*: every pixel of every labelled object is foreground, whatever the support (a
  perfect saliency model);
* *prototype matcher*: :class:`simprop.evaluation.PrototypeMatcher` on the frozen features.

If the first beats the second, a network can score well by segmenting salient objects without
reading its support (``docs/data.md``).  Usage::

    python3 benchmarks/saliency_vs_matcher.py [--root .] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from simprop.datasets import DataPaths, ImageStore, read_episodes
from simprop.evaluation import PrototypeMatcher
from simprop.features import open_feature_cache
from simprop.metrics import EpisodeMetrics, episode_label
from simprop.model import build_model
from simprop.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    params = load_params(root / args.params)
    os.chdir(root)  # model.backbone_weights is relative to the repository
    model = build_model("canet", params.model).eval()
    size = params.evaluate.image_size
    cache = open_feature_cache(params, root, size, model.backbone.checksum())
    paths = DataPaths(root / params.data.root)
    store = ImageStore(paths, size)
    matcher = PrototypeMatcher(store, torch.device("cpu"), model.backbone_features, params.evaluate.batch_size, cache)
    rows = {}
    for fold in params.splits.folds:
        episodes = read_episodes(paths.val_episode_file(fold), 1)
        objects = EpisodeMetrics()
        for e in episodes:
            label = store.label(e.query)
            objects.update((label > 0) & (label != 255), episode_label(label, e.cls), e.cls)
        queries = [store.label(i) for i in sorted({e.query for e in episodes})]
        large = [sum(1 for c in set(np.unique(q).tolist()) - {0, 255} if (q == c).sum() > 0.05 * q.size) for q in queries]
        rows[fold] = {
            "all_objects_miou": round(objects.summary()["miou"], 1),
            "matcher_miou": round(matcher.evaluate(episodes).summary()["miou"], 1),
            "large_objects_per_query": round(float(np.mean(large)), 2),
        }
        print(f"fold {fold}: {rows[fold]}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
