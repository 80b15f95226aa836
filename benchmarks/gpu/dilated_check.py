"""ASPP's DilatedConv2d on CUDA: the same values and gradients as conv2d, and its time on 9 x 9 maps.

On the default setup's 9 x 9 maps :class:`simprop.model.decoder.DilatedConv2d` drops the taps of
the dilation-12 and -18 branches that read only padding; the CPU tests check it against
``conv2d``.  This runs the same comparison with cuDNN (fp32 with TF32 off, and under bf16
autocast), on the default's shapes and the paper's 41 x 41, then times both forms forward +
backward (CUDA events, best of 3 rounds).  Writes ``$OUT/dilated_check.json``.

Usage (on a GPU machine): ``OUT=<dir> python3 benchmarks/gpu/dilated_check.py``
"""

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from simprop.model.decoder import ASPP_DILATIONS, DilatedConv2d  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/out"))
dev = torch.device("cuda")
torch.backends.cudnn.allow_tf32 = False  # exact fp32 convolutions for the comparison
torch.backends.cuda.matmul.allow_tf32 = False


def pair(in_channels: int, out_channels: int, dilation: int):
    torch.manual_seed(0)
    naive = torch.nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation).to(dev)
    fast = DilatedConv2d(in_channels, out_channels, dilation).to(dev)
    fast.load_state_dict(naive.state_dict())
    return naive, fast


def grads(module, x, amp: bool):
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = module(x)
    (out.float() * torch.linspace(-1, 2, out.numel(), device=dev).view_as(out)).sum().backward()
    return [out.float(), x.grad, module.weight.grad, module.bias.grad]


def compare(shape, dilation, amp: bool) -> dict:
    naive, fast = pair(shape[1], 16, dilation)
    x = torch.randn(*shape, device=dev)
    diffs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(grads(fast, x, amp), grads(naive, x, amp))]
    return {"shape": list(shape), "dilation": dilation, "amp": amp, "max_rel_diff": max(diffs)}


def timed(module, x, reps: int = 200) -> float:
    x = x.detach().requires_grad_(True)
    best = float("inf")
    for _ in range(3):
        for _ in range(10):
            module(x).square().sum().backward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            module(x).square().sum().backward()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": [], "timings_ms": []}
for shape in ((16, 32, 9, 9), (8, 16, 9, 9), (8, 512, 41, 41)):
    for dilation in ASPP_DILATIONS:
        for amp in (False, True):
            report["checks"].append(compare(shape, dilation, amp))
for shape in ((16, 32, 9, 9), (8, 16, 9, 9)):
    for dilation in ASPP_DILATIONS:
        naive, fast = pair(shape[1], 16, dilation)
        x = torch.randn(*shape, device=dev)
        report["timings_ms"].append({"shape": list(shape), "dilation": dilation,
                                     "conv2d": round(timed(naive, x), 4), "DilatedConv2d": round(timed(fast, x), 4)})
worst = {amp: max(c["max_rel_diff"] for c in report["checks"] if c["amp"] == amp) for amp in (False, True)}
report["worst_rel_diff"] = {"fp32": worst[False], "bf16": worst[True]}
print(json.dumps({k: v for k, v in report.items() if k != "checks"}, indent=1))
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "dilated_check.json").write_text(json.dumps(report, indent=1) + "\n")
sys.exit(0 if worst[False] <= 1e-5 and worst[True] <= 2e-2 else 1)
