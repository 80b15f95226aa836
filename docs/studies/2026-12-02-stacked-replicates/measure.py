"""Issue 26: does training the seeds of a (variant, fold) together share the cost of a step?

Two measurements, one thread, side by side in one process:

1. ``vmap``: the real network (``Trainer`` of fold 0 from ``params.yaml``; needs
   ``dvc repro features``), its trainable layers stacked for R = 3 seeds with
   ``torch.func.stack_module_state`` and called through ``torch.func.vmap(functional_call)``
   (``randomness="different"``), the loss per seed outside ``vmap`` (its ignore-index check is
   data-dependent control flow, which ``vmap`` refuses); against R lone steps of the trainer.
2. ``hand``: an FBAF + DPr + ASPP head written for R seeds folded into the batch, every convolution
   grouped over the seeds (``groups=R``) or looped per seed, against the same code at R = 1.

Usage: ``python3 docs/studies/2026-12-02-stacked-replicates/measure.py [--out result.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))


def ms(fn, n: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


def vmap_ratio(variant: str, replicas: int = 3, steps: int = 30) -> dict:
    from bench_pipeline import training_batches
    from torch.func import functional_call, vmap

    from simprop.model import dual_prediction_loss
    from simprop.params import load_params
    from simprop.train.trainer import Trainer

    trainer = Trainer(load_params(ROOT / "params.yaml"), variant, 0, ROOT)
    trainer.model.train()
    batches = training_batches(trainer, steps + 5)
    it = iter(batches * 4)
    lone = ms(lambda: trainer._step(next(it)), steps)
    base = copy.deepcopy(trainer.model).train()
    head = {k: v for k, v in base.named_parameters() if not k.startswith("backbone.")}
    params = {k: torch.stack([v.detach()] * replicas).requires_grad_() for k, v in head.items()}
    optimizer = torch.optim.SGD(list(params.values()), lr=0.01, momentum=0.9)
    keys = ["support_masks", "query_encoded", "support_encoded"]
    size = trainer.params.train.image_size

    def forward(p, batch):
        out = functional_call(base, p, (), {**batch, "out_size": (size, size)}, strict=False)
        return {k: v for k, v in out.items() if k in ("query", "support")}

    def step():
        b = next(it)
        stacked = {k: torch.stack([b[k]] * replicas) for k in keys}
        out = vmap(forward, randomness="different")(params, stacked)
        support = b["support_labels"] if trainer.spec.dual_prediction else None
        loss = sum(dual_prediction_loss({k: v[r] for k, v in out.items()}, b["query_labels"], support) for r in range(replicas))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    together = ms(step, steps)
    return {"variant": variant, "lone_ms": round(lone, 2), f"vmap_R{replicas}_ms": round(together, 2),
            "speedup": round(replicas * lone / together, 3)}  # fmt: skip


def _conv(x, wb, replicas, pad=1, dil=1, mode="grouped"):
    w, b = wb
    if replicas == 1:
        return F.conv2d(x, w, b, padding=pad, dilation=dil)
    m = x.shape[0] // replicas
    if mode == "loop":
        c = w.shape[0] // replicas
        return torch.cat([F.conv2d(x[r * m:(r + 1) * m], w[r * c:(r + 1) * c], b[r * c:(r + 1) * c], padding=pad,
                                   dilation=dil) for r in range(replicas)])  # fmt: skip
    xs = x.view(replicas, m, *x.shape[1:]).transpose(0, 1).reshape(m, replicas * x.shape[1], *x.shape[2:])
    y = F.conv2d(xs, w, b, padding=pad, dilation=dil, groups=replicas)
    return y.view(m, replicas, -1, *y.shape[2:]).transpose(0, 1).reshape(replicas * m, -1, *y.shape[2:])


def hand_ratio(replicas: int = 3, steps: int = 40, batch: int = 8, channels: int = 16, size: int = 9, out: int = 65) -> dict:
    torch.manual_seed(0)

    def make(r):
        def p(cout, cin, k):
            return (torch.randn(r * cout, cin, k, k) * 0.1).requires_grad_(), torch.zeros(r * cout).requires_grad_()

        c2 = 2 * channels  # FBAF's width
        return dict(g1=p(c2, c2, 3), g2=p(c2, c2 + 2, 3), g=p(c2, c2, 3), a0=p(channels, c2, 1), a1=p(channels, c2, 1),
                    a2=p(channels, c2, 3), a3=p(channels, c2, 1), a4=p(channels, c2, 1), proj=p(channels, 5 * channels, 1),
                    cls=p(2, channels, 1))  # fmt: skip

    def run(r, mode):
        P = make(r)
        fq, fs = torch.randn(r * batch, channels, size, size).relu(), torch.randn(r * batch, channels, size, size).relu()
        masks = (torch.rand(r * batch, 1, out, out) > 0.5).float()
        labels = torch.randint(0, 2, (2 * r * batch, out, out))
        params = [t for wb in P.values() for t in wb]

        def step():
            feats = torch.cat([fq, fs])
            m = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=True)
            m = torch.cat([m, m])
            zf = (feats * m).sum((2, 3)) / (m.sum((2, 3)) + 1e-5)
            zb = (feats * (1 - m)).sum((2, 3)) / ((1 - m).sum((2, 3)) + 1e-5)
            g0 = torch.cat([feats, zf[:, :, None, None].expand_as(feats)], 1)
            g1 = F.instance_norm(F.relu(_conv(g0, P["g1"], r, mode=mode)) + g0)
            a = (1 + F.cosine_similarity(feats, zf[:, :, None, None].expand_as(feats), dim=1)) / 2
            b = (1 + F.cosine_similarity(feats, zb[:, :, None, None].expand_as(feats), dim=1)) / 2
            af = (a / (a + b)).unsqueeze(1)
            g2 = F.instance_norm(F.relu(_conv(torch.cat([g1, af, 1 - af], 1), P["g2"], r, mode=mode)) + g1)
            g = F.instance_norm(F.relu(_conv(g2, P["g"], r, mode=mode)) + g2)
            pooled = _conv(g.mean((2, 3), keepdim=True), P["a0"], r, pad=0, mode=mode).relu().expand(-1, -1, size, size)
            branches = [pooled, _conv(g, P["a1"], r, pad=0, mode=mode).relu(),
                        _conv(g, P["a2"], r, pad=6, dil=6, mode=mode).relu(),
                        _conv(g, P["a3"], r, pad=0, mode=mode).relu(), _conv(g, P["a4"], r, pad=0, mode=mode).relu()]  # fmt: skip
            x = F.dropout2d(_conv(torch.cat(branches, 1), P["proj"], r, pad=0, mode=mode).relu(), 0.1, True)
            up = F.interpolate(_conv(x, P["cls"], r, pad=0, mode=mode), size=(out, out), mode="bilinear", align_corners=True)
            loss = F.cross_entropy(up, labels, ignore_index=255)
            for t in params:
                t.grad = None
            loss.backward()
            with torch.no_grad():
                for t in params:
                    t.sub_(0.01 * t.grad)

        return ms(step, steps)

    lone = run(1, "grouped")
    grouped, loop = run(replicas, "grouped"), run(replicas, "loop")
    return {"lone_ms": round(lone, 2), f"grouped_R{replicas}_ms": round(grouped, 2), f"loop_R{replicas}_ms": round(loop, 2),
            "speedup_grouped": round(replicas * lone / grouped, 3), "speedup_loop": round(replicas * lone / loop, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    result = {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "threads": 1, "torch": torch.__version__,
              "vmap": [vmap_ratio(v) for v in ("canet", "simpropnet")], "hand": hand_ratio()}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
