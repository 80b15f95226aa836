"""Is bf16 autocast worth it on this CPU? One FBAF-sized 3x3 convolution, fp32 vs bf16.

    python3 benchmarks/bench_bf16_cpu.py [--channels 256] [--size 41] [--batch 2]

Without native bf16 instructions (AVX512-BF16 or AMX) oneDNN emulates bf16 and autocast is
many times slower than fp32; that is why ``train.amp`` / ``evaluate.amp`` default to false and
``simprop.precision.amp_warning`` warns when they are set on such a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from simprop.precision import autocast, cpu_has_native_bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--size", type=int, default=41)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    conv = torch.nn.Conv2d(args.channels, args.channels, 3, padding=1)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    print(f"torch {torch.__version__}, {args.threads} threads, native bf16: {cpu_has_native_bf16()}")
    for amp in (False, True):
        with torch.no_grad(), autocast(torch.device("cpu"), amp):
            conv(x)  # warm-up (oneDNN primitive creation)
            start = time.perf_counter()
            conv(x)
            seconds = time.perf_counter() - start
        print(f"conv {args.channels}->{args.channels} 3x3 at {args.size}x{args.size}, batch {args.batch}, "
              f"{'bf16 autocast' if amp else 'fp32'}: {seconds:.3f} s")


if __name__ == "__main__":
    main()
