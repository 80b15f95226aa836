"""Does ``torch.compile`` (TorchInductor, CPU) make a default-setup training step faster?

The default step is ~100 small operators on 9 x 9 maps plus the encoder projection's two matrix
products, so operator fusion is the one speed-up of #12 that had not been measured. Run after
``dvc repro`` (it needs the data and feature cache), on a quiet machine, one thread (what each of
the two side-by-side fold workers gets on 2 cores):

    python3 benchmarks/bench_compile.py [--variants canet simpropnet] [--out f.json]

For each variant (fold 0, ``params.yaml``), two trainers built from the same seed run the same
batches: one eager, one whose network is wrapped in ``torch.compile`` (default mode). Reported:
the compiled trainer's first two steps with an empty Inductor cache (a fresh
``TORCHINDUCTOR_CACHE_DIR``: what the first training of a DAG pays) and again with the cache
filled (what a later fold of the same variant pays), ms per step after ``WARMUP`` steps for both,
and the mean loss over the timed steps (dropout draws from Inductor's own random stream when
compiled, so single losses differ; the means should agree). Inductor needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = tempfile.mkdtemp(prefix="simprop_inductor_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = CACHE  # before torch._inductor reads it: a cold first compile

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import training_batches  # noqa: E402

from simprop.params import load_params  # noqa: E402
from simprop.training import Trainer  # noqa: E402

WARMUP, STEPS = 20, 100


def timed_losses(trainer: Trainer, batches: list[dict]) -> tuple[float, list[float]]:
    """ms per step over ``batches[WARMUP:]`` and every step's loss."""
    trainer.model.train()
    losses = [trainer._step(b) for b in batches[:WARMUP]]
    start = time.perf_counter()
    losses += [trainer._step(b) for b in batches[WARMUP:]]
    return (time.perf_counter() - start) / (len(batches) - WARMUP) * 1000, losses


def compile_time(variant: str, batches: list[dict]) -> float:
    """Seconds to wrap a fresh trainer's network and run two steps (the compile happens there)."""
    torch._dynamo.reset()  # forget compiled frames: only Inductor's on-disk cache can help
    trainer = Trainer(load_params(ROOT / "params.yaml"), variant, 0, ROOT)
    trainer.network = torch.compile(trainer.network)
    trainer.model.train()
    start = time.perf_counter()
    for batch in batches[:2]:
        trainer._step(batch)
    return time.perf_counter() - start


def measure(variant: str) -> dict:
    params = load_params(ROOT / "params.yaml")
    eager = Trainer(params, variant, 0, ROOT)
    batches = training_batches(eager, WARMUP + STEPS)
    eager_ms, eager_losses = timed_losses(eager, batches)
    cold = compile_time(variant, batches)
    warm = compile_time(variant, batches)
    torch._dynamo.reset()
    compiled = Trainer(params, variant, 0, ROOT)
    compiled.network = torch.compile(compiled.network)
    compiled_ms, compiled_losses = timed_losses(compiled, batches)
    return {
        "variant": variant,
        "eager_ms_per_step": round(eager_ms, 1),
        "compiled_ms_per_step": round(compiled_ms, 1),
        "first_two_steps_cold_cache_s": round(cold, 1),
        "first_two_steps_warm_cache_s": round(warm, 1),
        "eager_mean_loss": round(sum(eager_losses[WARMUP:]) / STEPS, 4),
        "compiled_mean_loss": round(sum(compiled_losses[WARMUP:]) / STEPS, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["canet", "simpropnet"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__, "warmup": WARMUP, "steps": STEPS,
              "variants": [measure(v) for v in args.variants]}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
