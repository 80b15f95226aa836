"""Why the per-variant stages train folds side by side: ms per default training step, alone and in pairs.

Needs the default pipeline's data and feature cache (``dvc repro features episodes``).  For each
variant (fold 0, ``params.yaml``) three settings, each in fresh processes: one training with
``cores`` threads, one with 1 thread, and two 1-thread trainings at the same time (what
``train.parallel_folds: 2`` does on 2 cores).  Throughput = trainings x 1000 / ms per step.

Usage: ``python3 benchmarks/bench_parallel_folds.py [--variants canet simpropnet] [--out f.json]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP, STEPS = 20, 60

CHILD = """
import sys, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from pathlib import Path
from bench_pipeline import ms_per_step, training_batches
from simprop.params import load_params
from simprop.training import Trainer
trainer = Trainer(load_params(Path("params.yaml")), {variant!r}, 0, Path("."))
batches = training_batches(trainer, {warmup} + {steps})
print(ms_per_step(trainer, batches, warmup={warmup}))
"""


def run(variant: str, threads: int, copies: int) -> list[float]:
    code = CHILD.format(bench=str(ROOT / "benchmarks"), threads=threads, variant=variant, warmup=WARMUP, steps=STEPS)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"benchmark child failed for {variant}")
        out.append(float(stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    from simprop.parallel import available_cores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["canet", "simpropnet"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cores = available_cores()
    rows = []
    for variant in args.variants:
        for label, threads, copies in ((f"1 training, {cores} threads", cores, 1), ("1 training, 1 thread", 1, 1),
                                       ("2 trainings side by side, 1 thread each", 1, 2)):  # fmt: skip
            ms = run(variant, threads, copies)
            rows.append({"variant": variant, "setting": label, "ms_per_step": [round(m, 1) for m in ms],
                         "steps_per_s": round(sum(1000 / m for m in ms), 1)})  # fmt: skip
            print(f"{variant:<12} {label:<42} ms/step {', '.join(f'{m:.1f}' for m in ms):<12} -> {rows[-1]['steps_per_s']:5.1f} steps/s")
    if args.out:
        args.out.write_text(json.dumps({"cores": cores, "warmup": WARMUP, "steps": STEPS, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
