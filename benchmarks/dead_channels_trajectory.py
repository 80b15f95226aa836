"""Alive projection channels during one default-setup training, step by step.

Trains ``variant`` on ``fold`` for ``--epochs`` epochs with the committed params (plus ``--set
key=value`` overrides, e.g. ``--set train.projection_lr_scale=1.0``) in a scratch directory that
links this repository's ``data/`` and ``backbone/`` (run ``dvc repro features`` first; the
repository's own models and metrics are not touched), on one thread. After steps 1, 2, 3, 5, 10,
20, 50 and every 100th it counts the projection channels that are alive on the first 100 cached
images (``benchmarks/dead_channels.py``'s rule) and prints one JSON line at the end.

    python3 benchmarks/dead_channels_trajectory.py canet 2 --epochs 3 --set train.projection_lr_scale=1.0
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

from dead_channels import alive_channels, probe_features  # noqa: E402
from simprop.params import load_params  # noqa: E402
from sweep import override  # noqa: E402

PROBES = {1, 2, 3, 5, 10, 20, 50}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant")
    parser.add_argument("fold", type=int)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    params = override(load_params(REPO / "params.yaml"), **{"train.epochs": args.epochs, **sets})
    from bench_pipeline import scratch_root  # imports tqdm: after TQDM_DISABLE is set

    from simprop.training import Trainer

    probe = probe_features(REPO / "data" / "features" / "color.npy", 100)
    with scratch_root(REPO) as root:
        trainer = Trainer(params, args.variant, args.fold, root)
        step, steps, trajectory = trainer._step, itertools.count(1), []

        def counted(batch):
            loss = step(batch)
            n = next(steps)
            if n in PROBES or n % 100 == 0:
                trajectory.append({"step": n, "alive": alive_channels(trainer.model, probe)[0], "loss": round(loss, 4)})
            return loss

        trainer._step = counted
        summary = trainer.run()
    print(json.dumps({"variant": args.variant, "fold": args.fold, "set": sets,
                      "channels": params.model.channels, "best_val_miou": round(summary["best_val_miou"], 2),
                      "trajectory": trajectory}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
