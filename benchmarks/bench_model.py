"""Model throughput and memory per variant, on the CPU or a GPU (a script, not a test).

    python benchmarks/bench_model.py [--variants canet,dpr] [--modes no_grad,autograd,cached]
                                     [--threads 2] [--size 321] [--batch 8] [--reps 1] [--warmup 1]
                                     [--device cpu|cuda] [--precisions fp32,bf16,auto] [--channels-last]
                                     [--conv-kernel auto|shifted_gemm|conv2d]
                                     [--public-canet path/to/one_shot_network.py]

For each variant and mode, in a fresh subprocess (so the peak RSS belongs to that case):

* train: forward + backward + SGD step of one training batch (``--batch`` episodes,
  ``--size`` x ``--size``, 1-shot; ICA applied for ``simpropnet``), model in train mode;
* 5shot: forward of one 5-shot episode in eval mode.

Modes: ``no_grad`` = frozen backbone run under ``torch.no_grad()`` (what the model does);
``autograd`` = the backbone's parameters require grad and its activations are kept, as when
a backbone is "frozen" only by leaving it out of the optimizer (and evaluation without
``no_grad``); ``cached`` = backbone features precomputed (feature cache), trainable part only.
The random ('none') backbone is used: timings do not depend on the weights' values.

Precisions: ``fp32``, or ``bf16`` = the model under :func:`simprop.infra.device.autocast` (what
``train.amp: true`` does: bf16 autocast on the CPU and on bf16-capable GPUs, fp16 with a
gradient scaler on older GPUs), or ``auto`` = what ``amp: auto`` picks on this machine
(:func:`simprop.infra.device.resolve_amp`: bf16 where the CPU has ``avx512_bf16`` / ``amx_bf16``
or the GPU bf16, else fp32), printed as ``auto -> bf16``.  ``--conv-kernel``: the encoder conv's
form (``model.conv_kernel``; ``auto`` by default, as the paper setup).  The first line names
the machine (:func:`simprop.infra.machine.machine_info`).  ``--channels-last`` also times each case with the model and
inputs in channels-last memory layout.  On a GPU every timed step ends with
``torch.cuda.synchronize()`` and the peak is the GPU's allocated memory.

``--public-canet FILE``: also time the public CANet's training step, side by side, in the same
run and conditions: ``Res_Deeplab(2)`` from the given ``one_shot_network.py`` of icoz69/CaNet
(not vendored here: pass your own copy), its backbone frozen as CANet's ``train.py`` does
(``utils.turn_off``: ``conv1``, ``layer1-3`` without gradients, ``bn1`` and every BatchNorm in
train mode), zero history masks, the prediction upsampled to the input and CANet's
cross-entropy, SGD over the trainable layers; against our ``canet`` (``no_grad`` backbone, fp32,
contiguous), printed as the ratio of their times; and ``simpropnet`` at the precision ``amp:
auto`` picks (when timed: ``--variants canet,simpropnet --precisions fp32,auto``) against the
public CANet in fp32, issue 29's acceptance: ``<= 1`` where bf16 is native, the ratio stated
where it is not.
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

from simprop.infra.device import amp_dtype, autocast, needs_grad_scaler, resolve_amp
from simprop.infra.machine import machine_info
from simprop.model import VARIANTS
from simprop.model.ica import apply_input_channel_averaging
from simprop.model.losses import dual_prediction_loss
from simprop.model.network import build_model
from simprop.params import ModelParams

MODES = ("no_grad", "autograd", "cached")
SHOTS_EVAL = 5
ICA_P = 0.25


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_case(variant: str, mode: str, task: str, size: int, batch: int, reps: int, warmup: int,
             device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
             conv_kernel: str = "auto") -> dict:  # fmt: skip
    torch.manual_seed(0)
    dev = torch.device(device)
    amp = precision == "bf16"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(variant, ModelParams(conv_kernel=conv_kernel)).to(dev, memory_format=layout)
    if mode == "autograd":
        model.backbone_no_grad = False
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    counts = model.parameter_counts()
    rss_model = peak_rss_mib()
    gen = torch.Generator().manual_seed(0)  # CPU generator: ICA draws on the CPU (simprop.model.ica)
    if task == "train":
        b, k = batch, 1
        model.train()
        opt = torch.optim.SGD(model.trainable_parameters(), lr=2.5e-3, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler(dev.type, enabled=needs_grad_scaler(dev, amp))
    else:
        b, k = 1, SHOTS_EVAL
        model.eval()
    q = torch.randn(b, 3, size, size, device=dev).contiguous(memory_format=layout)
    s = torch.randn(b, k, 3, size, size, device=dev)
    m = torch.zeros(b, k, size, size, device=dev)
    m[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    labels = m[:, 0].long()
    if mode == "cached":
        with autocast(dev, amp):
            qf = model.backbone_features(q)
            sf = model.backbone_features(s.flatten(0, 1)).view(b, k, *qf.shape[1:])
        rss_model = peak_rss_mib()  # the cache is part of the input, not of the step

    def step() -> None:
        if task == "train":
            query = apply_input_channel_averaging(q, ICA_P, gen.manual_seed(0)) if model.uses_ica else q
            with autocast(dev, amp):
                if mode == "cached":
                    out = model(support_masks=m, query_feats=qf, support_feats=sf, out_size=(size, size))
                else:
                    out = model(query, s, m)
                loss = dual_prediction_loss(out, labels, m.long() if "support" in out else None)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            ctx = torch.enable_grad() if mode == "autograd" else torch.no_grad()
            with ctx, autocast(dev, amp):
                if mode == "cached":
                    model(support_masks=m, query_feats=qf, support_feats=sf, out_size=(size, size))
                else:
                    model(q, s, m)
        if dev.type == "cuda":
            torch.cuda.synchronize()

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
        "device": device,
        "precision": precision if not amp else f"{precision} ({str(amp_dtype(dev)).replace('torch.', '')} autocast)",
        "channels_last": channels_last,
        "seconds": min(timed),
        "seconds_all": timed,
        "warmup_s": times[:warmup],
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
        "rss_before_step_mib": rss_model,
        **counts,
    }


def run_public_canet(path: str, size: int, batch: int, reps: int, warmup: int, device: str = "cpu") -> dict:
    """One training step of the public CANet (``Res_Deeplab`` of ``path``), timed like :func:`run_case`."""
    import importlib.util

    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("public_canet", path)
    if spec is None or spec.loader is None:
        sys.exit(f"--public-canet {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = module.Res_Deeplab(num_classes=2).to(dev)
    for layer in (model.conv1, model.layer1, model.layer2, model.layer3):  # CaNet utils.turn_off
        for p in layer.parameters():
            p.requires_grad_(False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=2.5e-3, momentum=0.9, weight_decay=5e-4)
    q = torch.randn(batch, 3, size, size, device=dev)
    s = torch.randn(batch, 3, size, size, device=dev)
    m = torch.zeros(batch, 1, size, size, device=dev)
    m[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    labels = m[:, 0].long()
    feature = (size + 7) // 8
    history = torch.zeros(batch, 2, feature, feature, device=dev)
    rss_model = peak_rss_mib()

    def step() -> None:
        pred = model(q, s, m, history)
        pred = F.interpolate(pred, size=(size, size), mode="bilinear", align_corners=True)
        loss = F.cross_entropy(pred, labels, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(warmup + reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": "public_canet", "mode": "turn_off", "task": "train", "device": device, "precision": "fp32",
        "channels_last": False, "seconds": min(times[warmup:]), "seconds_all": times[warmup:],
        "warmup_s": times[:warmup], "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
        "rss_before_step_mib": rss_model, "trainable": sum(p.numel() for p in trainable),
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad), "source": path,
    }  # fmt: skip


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
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precisions", default="fp32",
                    help="comma list of fp32, bf16 (train.amp's autocast), auto (what amp: auto picks here)")
    ap.add_argument("--conv-kernel", default="auto", choices=("auto", "shifted_gemm", "conv2d"),
                    help="the encoder conv's form (model.conv_kernel)")
    ap.add_argument("--channels-last", action="store_true", help="also time every case in channels-last layout")
    ap.add_argument("--public-canet", metavar="FILE",
                    help="icoz69/CaNet's one_shot_network.py: time its training step beside our canet")
    ap.add_argument("--_public", help=argparse.SUPPRESS)
    ap.add_argument("--_case", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--_task", help=argparse.SUPPRESS)
    ap.add_argument("--_precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--_layout", default="contiguous", help=argparse.SUPPRESS)
    ap.add_argument("--_conv_kernel", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args._public:  # child process: the public CANet's training step, JSON on stdout
        print(json.dumps(run_public_canet(args._public, args.size, args.batch, args.reps, args.warmup, args.device)))
        return
    if args._case:  # child process: one case, JSON on stdout
        row = run_case(*args._case, args._task, args.size, args.batch, args.reps, args.warmup, args.device,
                       args._precision, args._layout == "channels_last", args._conv_kernel)  # fmt: skip
        print(json.dumps(row))
        return

    variants = args.variants.split(",")
    modes = args.modes.split(",")
    precisions = args.precisions.split(",")
    layouts = ["contiguous", "channels_last"] if args.channels_last else ["contiguous"]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    for mo in modes:
        if mo not in MODES:
            sys.exit(f"unknown mode {mo!r}; choose from {list(MODES)}")
    for pr in precisions:
        if pr not in ("fp32", "bf16", "auto"):
            sys.exit(f"unknown precision {pr!r}; choose from fp32, bf16, auto")
    picked = "bf16" if resolve_amp("auto", torch.device(args.device)) else "fp32"  # amp: auto on this machine
    precisions = list(dict.fromkeys(picked if pr == "auto" else pr for pr in precisions))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads, cpu count {os.cpu_count()}"
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine_info().items()), flush=True)
    print(
        f"amp: auto picks {picked} here; model.conv_kernel {args.conv_kernel}; "
        f"torch {torch.__version__}, {args.device} ({where}), "
        f"input {args.size}x{args.size}, train batch {args.batch} (1-shot), eval 1 episode x {SHOTS_EVAL} shots, "
        f"best of {args.reps} after {args.warmup} warm-up run(s)",
        flush=True,
    )
    rows = []
    for task in args.tasks.split(","):
        for v in variants:
            for mo in modes:
                for pr in precisions:
                    for layout in layouts:
                        cmd = [sys.executable, __file__, "--_case", v, mo, "--_task", task, "--threads", str(args.threads),
                               "--size", str(args.size), "--batch", str(args.batch), "--reps", str(args.reps),
                               "--warmup", str(args.warmup), "--device", args.device, "--_precision", pr,
                               "--_layout", layout, "--_conv_kernel", args.conv_kernel]  # fmt: skip
                        res = subprocess.run(cmd, capture_output=True, text=True)
                        if res.returncode != 0:
                            print(res.stderr, file=sys.stderr)
                            sys.exit(f"case {task} {v} {mo} {pr} {layout} failed")
                        row = json.loads(res.stdout.strip().splitlines()[-1])
                        rows.append(row)
                        memory = row["peak_gpu_mib"] if row["peak_gpu_mib"] is not None else row["peak_rss_mib"]
                        print(f"  {task:6s} {v:11s} {mo:9s} {pr:5s} {layout:14s} {row['seconds']:8.3f} s   "
                              f"peak {'GPU' if row['peak_gpu_mib'] is not None else 'RSS'} {memory:8.0f} MiB", flush=True)  # fmt: skip
    if args.public_canet:
        if not os.path.isfile(args.public_canet):
            sys.exit(f"--public-canet {args.public_canet}: no such file (icoz69/CaNet's one_shot_network.py)")
        cmd = [sys.executable, __file__, "--_public", args.public_canet, "--threads", str(args.threads), "--size",
               str(args.size), "--batch", str(args.batch), "--reps", str(args.reps), "--warmup", str(args.warmup),
               "--device", args.device]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            sys.exit("the public CANet case failed")
        public = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(public)
        ours = [r for r in rows if r["variant"] == "canet" and r["task"] == "train" and r["mode"] == "no_grad"
                and r["precision"] == "fp32" and not r["channels_last"]]  # fmt: skip
        print(f"  train  public CANet ({args.public_canet}) {public['seconds']:8.3f} s")
        if ours:
            print(f"  our canet / public CANet training step: {public['seconds'] / ours[0]['seconds']:.2f}x the public "
                  f"model's speed ({ours[0]['seconds']:.3f} s vs {public['seconds']:.3f} s; same run, {where})")  # fmt: skip
        else:
            print("  (add canet with --variants canet --modes no_grad --tasks train for the ratio)")
        auto = [r for r in rows if r["variant"] == "simpropnet" and r["task"] == "train" and r["mode"] == "no_grad"
                and r["precision"].split(" ")[0] == picked and not r["channels_last"]]  # fmt: skip
        if auto:
            ratio = auto[0]["seconds"] / public["seconds"]
            verdict = "met" if ratio <= 1 else "not met"
            print(f"  simpropnet at amp: auto's precision ({picked}) / public CANet fp32 training step: {ratio:.2f} "
                  f"({auto[0]['seconds']:.3f} s vs {public['seconds']:.3f} s; issue 29's bar <= 1: {verdict}; "
                  f"native bf16: {machine_info()['cpu_native_bf16'] if args.device == 'cpu' else picked == 'bf16'})")  # fmt: skip
        else:
            print("  (add simpropnet with --variants canet,simpropnet --precisions fp32,auto for the amp: auto ratio)")
    print()
    print("| variant | trainable params | frozen params |")
    print("| --- | ---: | ---: |")
    seen = set()
    for r in rows:
        if r["variant"] not in seen:
            seen.add(r["variant"])
            print(f"| {r['variant']} | {r['trainable']:,} | {r['frozen']:,} |")
    print()
    print("| task | variant | backbone | precision | layout | time (s) | peak memory (MiB) |")
    print("| --- | --- | --- | --- | --- | ---: | ---: |")
    for r in rows:
        label = "train step (fwd+bwd+SGD)" if r["task"] == "train" else "5-shot episode forward"
        memory = r["peak_gpu_mib"] if r["peak_gpu_mib"] is not None else r["peak_rss_mib"]
        layout = "channels_last" if r["channels_last"] else "contiguous"
        print(f"| {label} | {r['variant']} | {r['mode']} | {r['precision']} | {layout} | {r['seconds']:.3f} | {memory:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
