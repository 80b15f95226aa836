"""Model throughput and memory on the CPU, per variant (a script, not a test).

    python benchmarks/bench_model.py [--variants canet,dpr] [--modes no_grad,autograd,cached]
                                     [--threads 2] [--size 321] [--batch 8] [--reps 1] [--warmup 1]

For each variant and mode, in a fresh subprocess (so the peak RSS belongs to that case):

* train: forward + backward + SGD step of one training batch (``--batch`` episodes,
  ``--size`` x ``--size``, 1-shot; ICA applied for ``simpropnet``), model in train mode;
* 5shot: forward of one 5-shot episode in eval mode.

Modes: ``no_grad`` = frozen backbone run under ``torch.no_grad()`` (what the model does);
``autograd`` = the backbone's parameters require grad and its activations are kept, as when
a backbone is "frozen" only by leaving it out of the optimizer (and evaluation without
``no_grad``); ``cached`` = backbone features precomputed (feature cache), trainable part only.
The random ('none') backbone is used: timings do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from simprop.model import VARIANTS, apply_input_channel_averaging, build_model, dual_prediction_loss
from simprop.params import ModelParams

MODES = ("no_grad", "autograd", "cached")
SHOTS_EVAL = 5
ICA_P = 0.25


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_case(variant: str, mode: str, task: str, size: int, batch: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = build_model(variant, ModelParams())
    if mode == "autograd":
        model.backbone_no_grad = False
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    counts = model.parameter_counts()
    rss_model = peak_rss_mib()
    gen = torch.Generator().manual_seed(0)
    if task == "train":
        b, k = batch, 1
        model.train()
        opt = torch.optim.SGD(model.trainable_parameters(), lr=2.5e-3, momentum=0.9, weight_decay=5e-4)
    else:
        b, k = 1, SHOTS_EVAL
        model.eval()
    q = torch.randn(b, 3, size, size)
    s = torch.randn(b, k, 3, size, size)
    m = torch.zeros(b, k, size, size)
    m[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    labels = m[:, 0].long()
    if mode == "cached":
        qf = model.backbone_features(q)
        sf = model.backbone_features(s.flatten(0, 1)).view(b, k, *qf.shape[1:])
        rss_model = peak_rss_mib()  # the cache is part of the input, not of the step

    def step() -> None:
        if task == "train":
            query = apply_input_channel_averaging(q, ICA_P, gen) if model.uses_ica else q
            if mode == "cached":
                out = model(support_masks=m, query_feats=qf, support_feats=sf, out_size=(size, size))
            else:
                out = model(query, s, m)
            loss = dual_prediction_loss(out, labels, m.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            ctx = torch.enable_grad() if mode == "autograd" else torch.no_grad()
            with ctx:
                if mode == "cached":
                    model(support_masks=m, query_feats=qf, support_feats=sf, out_size=(size, size))
                else:
                    model(q, s, m)

    times = []
    for _ in range(warmup + reps):  # warm-up runs: allocator, oneDNN kernels
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return {
        "variant": variant,
        "mode": mode,
        "task": task,
        "seconds": min(timed),
        "seconds_all": timed,
        "warmup_s": times[:warmup],
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_step_mib": rss_model,
        **counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--modes", default="no_grad,autograd")
    ap.add_argument("--tasks", default="train,5shot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=321)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--_case", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--_task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args._case:  # child process: one case, JSON on stdout
        row = run_case(*args._case, args._task, args.size, args.batch, args.reps, args.warmup)
        print(json.dumps(row))
        return

    variants = args.variants.split(",")
    modes = args.modes.split(",")
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    for mo in modes:
        if mo not in MODES:
            sys.exit(f"unknown mode {mo!r}; choose from {list(MODES)}")
    print(
        f"torch {torch.__version__}, {args.threads} threads, cpu count {os.cpu_count()}, "
        f"input {args.size}x{args.size}, train batch {args.batch} (1-shot), eval 1 episode x {SHOTS_EVAL} shots, "
        f"best of {args.reps} after {args.warmup} warm-up run(s)",
        flush=True,
    )
    rows = []
    for task in args.tasks.split(","):
        for v in variants:
            for mo in modes:
                cmd = [sys.executable, __file__, "--_case", v, mo, "--_task", task, "--threads", str(args.threads),
                       "--size", str(args.size), "--batch", str(args.batch), "--reps", str(args.reps),
                       "--warmup", str(args.warmup)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr, file=sys.stderr)
                    sys.exit(f"case {task} {v} {mo} failed")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"  {task:6s} {v:11s} {mo:9s} {row['seconds']:8.2f} s   peak RSS {row['peak_rss_mib']:8.0f} MiB",
                    flush=True,
                )
    print()
    print("| variant | trainable params | frozen params |")
    print("| --- | ---: | ---: |")
    seen = set()
    for r in rows:
        if r["variant"] not in seen:
            seen.add(r["variant"])
            print(f"| {r['variant']} | {r['trainable']:,} | {r['frozen']:,} |")
    print()
    print("| task | variant | backbone | time (s) | peak RSS (MiB) |")
    print("| --- | --- | --- | ---: | ---: |")
    for r in rows:
        label = "train step (fwd+bwd+SGD)" if r["task"] == "train" else "5-shot episode forward"
        print(f"| {label} | {r['variant']} | {r['mode']} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
