"""Where a default training step's time goes, and whether its convolutions have faster forms.

Needs the default pipeline's data and feature cache (``dvc repro features episodes``). Three parts:

1. for each variant, a :class:`simprop.train.trainer.Trainer` built from ``params.yaml`` (fold 0) runs
   ``WARMUP`` untimed steps, then ``--steps`` timed steps (ms/step), then ``--profile-steps`` steps under
   ``torch.profiler``: the share of the shared encoder projection's convolution (1536 input
   channels, forward and backward: oneDNN's convolution or the shifted-GEMM form's matrix
   products) in the profiled CPU time;
2. that convolution alone (batch 16 = 8 queries + 8 supports, the cached 9 x 9 feature maps,
   ``model.channels`` outputs, 3 x 3, dilation 1 and 2) forward + backward: ``conv2d`` (oneDNN)
   and the shifted-GEMM form the encoder uses (:mod:`simprop.model.shifted_gemm`), each with
   contiguous and channels-last input;
3. ASPP's dilated branches on 9 x 9 maps: ``nn.Conv2d`` vs :class:`simprop.model.decoder.DilatedConv2d`
   (:func:`aspp_branches`).

Usage: ``python3 benchmarks/bench_train_step.py [--variants canet simpropnet] [--out step.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_pipeline's step helpers
WARMUP = 20  # untimed steps first: with 5, the first variant in a process ran ~40 % slower


def step_breakdown(variant: str, steps: int, profile_steps: int) -> dict:
    from bench_pipeline import ms_per_step, training_batches
    from torch.profiler import ProfilerActivity, profile

    from simprop.params import load_params
    from simprop.train.trainer import Trainer

    trainer = Trainer(load_params(ROOT / "params.yaml"), variant, 0, ROOT)
    batches = training_batches(trainer, WARMUP + steps + profile_steps)
    step_ms = ms_per_step(trainer, batches[: WARMUP + steps], warmup=WARMUP)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in batches[WARMUP + steps :]:
            trainer._step(batch)
    total = projection = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        total += event.self_cpu_time_total
        shapes = str(event.input_shapes)
        conv = event.key in ("aten::mkldnn_convolution", "aten::convolution_backward") and ", 1536, 3, 3]" in shapes
        gemm = event.key == "aten::mm" and "1536]" in shapes  # the shifted-GEMM form's two products
        if conv or gemm:
            projection += event.self_cpu_time_total
    return {"variant": variant, "ms_per_step": round(step_ms, 1), "projection_conv_share": round(projection / total, 3)}


def projection_conv(channels: int, reps: int) -> list[dict]:
    from simprop.model.shifted_gemm import ShiftedGemmConv2d

    torch.manual_seed(0)
    x = torch.randn(16, 1536, 9, 9)
    rows = []
    for dilation in (1, 2):
        conv = torch.nn.Conv2d(1536, channels, 3, padding=dilation, dilation=dilation)
        gemm = ShiftedGemmConv2d(1536, channels, dilation=dilation)
        gemm.load_state_dict(conv.state_dict())
        channels_last = x.contiguous(memory_format=torch.channels_last)  # the feature cache's layout
        for layout, module, inp in (
            ("conv2d contiguous", conv, x),
            ("conv2d channels_last", conv, channels_last),
            ("shifted GEMM contiguous", gemm, x),
            ("shifted GEMM channels_last", gemm, channels_last),
        ):
            def once() -> None:
                module(inp).contiguous().square().sum().backward()

            for _ in range(3):
                once()
            started = time.perf_counter()
            for _ in range(reps):
                once()
            rows.append({"dilation": dilation, "layout": layout, "ms": round((time.perf_counter() - started) / reps * 1000, 2)})
    return rows


def aspp_branches(channels: int, reps: int) -> list[dict]:
    """ASPP's dilated branches on the default 9 x 9 maps, forward + backward (input gradient too,
    as in training): ``nn.Conv2d`` vs :class:`~simprop.model.decoder.DilatedConv2d` (the taps that
    read only padding skipped), for the CANet-fusion input (``channels``, batch 8) and the FBAF
    one (2 x ``channels``, batch 16: query and support decoded together with DPr)."""
    from simprop.model.decoder import ASPP_DILATIONS, DilatedConv2d

    torch.manual_seed(0)
    rows = []
    for batch, in_channels in ((8, channels), (16, 2 * channels)):
        x = torch.randn(batch, in_channels, 9, 9, requires_grad=True)
        for dilation in ASPP_DILATIONS:
            naive = torch.nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
            skipping = DilatedConv2d(in_channels, channels, dilation)
            skipping.load_state_dict(naive.state_dict())
            times = {"conv2d": [], "DilatedConv2d": []}
            for _ in range(3):  # interleaved rounds: both see the same machine state
                for name, module in (("conv2d", naive), ("DilatedConv2d", skipping)):
                    for _ in range(5):
                        module(x).square().sum().backward()
                    started = time.perf_counter()
                    for _ in range(reps):
                        module(x).square().sum().backward()
                    times[name].append((time.perf_counter() - started) / reps * 1000)
            rows.append({"input": [batch, in_channels, 9, 9], "dilation": dilation,
                         **{name: round(min(t), 3) for name, t in times.items()}})  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["canet", "simpropnet"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from simprop.params import load_params

    result = {
        "threads": torch.get_num_threads(),
        "steps": [step_breakdown(v, args.steps, args.profile_steps) for v in args.variants],
        "projection_conv": projection_conv(load_params(ROOT / "params.yaml").model.channels, args.reps),
        "aspp_branches": aspp_branches(load_params(ROOT / "params.yaml").model.channels, 10 * args.reps),
    }
    for row in result["steps"]:
        print(f"{row['variant']:<12} {row['ms_per_step']:7.1f} ms/step   projection conv {row['projection_conv_share']:.0%} of profiled CPU time")
    for row in result["projection_conv"]:
        print(f"projection conv, dilation {row['dilation']}, {row['layout']:<26} {row['ms']:6.2f} ms forward + backward")
    for row in result["aspp_branches"]:
        print(f"ASPP branch, input {row['input']}, dilation {row['dilation']:>2}: conv2d {row['conv2d']:.3f} ms, "
              f"DilatedConv2d {row['DilatedConv2d']:.3f} ms forward + backward (best of 3)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
