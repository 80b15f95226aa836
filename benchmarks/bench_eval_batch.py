"""What two default-setup settings cost: evaluate.batch_size and a frozen encoder projection.

Run after ``dvc repro`` (it reads the committed checkpoints, data and feature cache), on a quiet
machine, one thread (what each of the two side-by-side fold workers gets on 2 cores):

    python3 benchmarks/bench_eval_batch.py [--variants canet simpropnet] [--fold 0] [--out f.json]

1. ``evaluate_model`` (everything the evaluate stage scores for one (variant, fold): 3 test sets x
   1- and 5-shot, mismatched support, matcher, identical input, untrained) at
   ``evaluate.batch_size`` 16, 64 and 256: wall time and the scores, which must not change.
2. Training ms per step (same batches, fold 0) with ``train.projection_lr_scale`` 0.01 (the
   encoder conv trains) and 0 (frozen: the trainer feeds its cached outputs,
   :class:`simprop.training.EncodedFeatures`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import ms_per_step, scratch_root, training_batches  # noqa: E402

from simprop.evaluation import evaluate_model  # noqa: E402
from simprop.features import open_feature_cache  # noqa: E402
from simprop.model import build_model, expected_identity, load_checkpoint  # noqa: E402
from simprop.params import Params, load_params  # noqa: E402
from simprop.training import Trainer, TrainPaths  # noqa: E402

BATCH_SIZES = (16, 64, 256)
SCALES = (0.01, 0.0)
WARMUP, STEPS = 10, 100


def time_evaluation(params: Params, variant: str, fold: int, batch_size: int) -> dict:
    params = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, batch_size=batch_size))
    device = torch.device("cpu")
    untrained = build_model(variant, params.model, init_seed=params.train.seed).eval()
    expected = expected_identity(params, variant, fold, ROOT, untrained.backbone.checksum())
    model, _ = load_checkpoint(TrainPaths(ROOT, variant, fold).best, map_location=device, expected=expected)
    cache = open_feature_cache(params, ROOT, params.evaluate.image_size, model.backbone.checksum())
    start = time.perf_counter()
    record, _ = evaluate_model(params, model, variant, fold, ROOT, device, cache, untrained=untrained)
    wall = time.perf_counter() - start
    scores = {"shot1": record["shot1"]["miou_mean"], "shot5": record["shot5"]["miou_mean"],
              "mismatched": record["mismatched"]["miou_mean"], "identical": record["identical"]["miou"]}  # fmt: skip
    return {"batch_size": batch_size, "wall_s": round(wall, 2), "scores": scores}


def time_training(params: Params, variant: str, fold: int, scale: float) -> dict:
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, projection_lr_scale=scale))
    with scratch_root(ROOT, params.data.root) as root:  # the committed checkpoints stay untouched
        trainer = Trainer(params, variant, fold, root)
        ms = ms_per_step(trainer, training_batches(trainer, WARMUP + STEPS), warmup=WARMUP)
    return {"projection_lr_scale": scale, "frozen": trainer.encoded is not None, "ms_per_step": round(ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["canet", "simpropnet"])
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    result = {"threads": args.threads, "fold": args.fold, "evaluation": {}, "training": {}}
    for variant in args.variants:
        rows = [time_evaluation(params, variant, args.fold, b) for b in BATCH_SIZES]
        result["evaluation"][variant] = rows
        for row in rows:
            same = row["scores"] == rows[0]["scores"]
            print(f"evaluate {variant} fold {args.fold} batch {row['batch_size']:>3}: {row['wall_s']:6.2f} s, "
                  f"1-shot {row['scores']['shot1']:.4f}, scores {'identical to' if same else 'DIFFER from'} batch "
                  f"{rows[0]['batch_size']}", flush=True)  # fmt: skip
        result["training"][variant] = [time_training(params, variant, args.fold, s) for s in SCALES]
        for row in result["training"][variant]:
            print(f"train {variant} fold {args.fold} projection_lr_scale {row['projection_lr_scale']}: "
                  f"{row['ms_per_step']:.1f} ms/step", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
