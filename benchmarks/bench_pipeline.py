"""Training and evaluation throughput on this machine (a benchmark, not a test).

Run after `dvc repro` (it reads the default pipeline's data/, backbone and feature cache):

    python3 benchmarks/bench_pipeline.py [--variant simpropnet] [--fold 0] [--steps 30] [--episodes 200]

Prints training images/s (query + support images per second of optimiser steps, with the
cached backbone features as the default setup trains) and evaluation episodes/s for 1- and
5-shot, with the per-image feature memoisation (as `evaluate` runs) and without it (every
episode recomputes its images' backbone features), plus peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from simprop.data.datasets import DataPaths, ImageStore
from simprop.data.io import read_episodes
from simprop.engine.features import open_feature_cache
from simprop.engine.inference import EpisodeRunner
from simprop.params import load_params
from simprop.train.trainer import Trainer


class NoMemoRunner(EpisodeRunner):
    """Recomputes the features of every batch of episodes (what a naive evaluator does)."""

    def features(self, image_ids):
        self._features.clear()
        return super().features(image_ids)


def training_batches(trainer: Trainer, count: int) -> list[dict]:
    """``count`` training batches of epoch 0 (pairs in order), built as the trainer builds them."""
    tp = trainer.params.train
    batches = []
    for i in range(count):
        indices = list(range(i * tp.batch_size, (i + 1) * tp.batch_size))
        batches.append(trainer.batches.build(0, indices, [j % len(trainer.pairs) for j in indices], tp.ica_initial_p))
    return batches


def ms_per_step(trainer: Trainer, batches: list[dict], warmup: int = 1) -> float:
    """Mean wall time of a training step (forward, backward, SGD) over ``batches[warmup:]``."""
    trainer.model.train()
    for batch in batches[:warmup]:
        trainer._step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        trainer._step(batch)
    return (time.perf_counter() - start) / len(batches[warmup:]) * 1000


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="simpropnet")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params("params.yaml")
    root = Path(".")

    trainer = Trainer(params, args.variant, args.fold, root)
    tp = params.train
    step_ms = ms_per_step(trainer, training_batches(trainer, args.steps), warmup=1)
    images_per_step = tp.batch_size * 2  # queries and supports
    print(f"training ({args.variant}, batch {tp.batch_size}, {tp.image_size}px, channels {params.model.channels}, "
          f"cached features={trainer.cache is not None}): {images_per_step / step_ms * 1000:.1f} images/s, "
          f"{step_ms:.0f} ms/step")  # fmt: skip

    model = trainer.model.eval()
    ev = params.evaluate
    store = ImageStore(DataPaths(root / params.data.root), ev.image_size)
    cache = open_feature_cache(params, root, ev.image_size, model.backbone.checksum())
    for shots in ev.shots:
        episodes = read_episodes(DataPaths(root / params.data.root).episode_file(args.fold, "test_seed1"), shots)
        episodes = episodes[: args.episodes]
        for label, runner in (
            ("feature cache file + memo", EpisodeRunner(model, store, torch.device("cpu"), ev.batch_size, cache)),
            ("per-image memo (no cache file)", EpisodeRunner(model, store, torch.device("cpu"), ev.batch_size, None)),
            ("no memo (recompute per batch of episodes)", NoMemoRunner(model, store, torch.device("cpu"), ev.batch_size, None)),
        ):
            start = time.perf_counter()
            runner.evaluate(episodes)
            elapsed = time.perf_counter() - start
            print(f"evaluation {shots}-shot, {label}: {len(episodes) / elapsed:.1f} episodes/s "
                  f"({runner.feature_computations} backbone passes for {len(episodes)} episodes)")  # fmt: skip
    print(f"peak RSS {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
