"""Time and peak memory of the augment + splits stages on a full-size generated tree.

The tree has the real archives' counts and size (11,355 SBD + 2,913 VOC2012 segmentation
images at 500x375, about 12k unique images), generated once into ``--root`` (reused when
its params match). Then SegmentationClassAug and the PASCAL-5i splits are built exactly as
the pipeline does, and wall time and peak resident memory (the process plus its worker
processes, sampled every 50 ms) are reported. Target: under 2 minutes on 2 cores.

    python3 benchmarks/bench_data.py --workers 2            # full size
    python3 benchmarks/bench_data.py --sbd 600 --voc 240     # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time

from simprop.data.augment import build_segmentation_class_aug
from simprop.data.download import check_raw_tree
from simprop.data.layout import DataLayout
from simprop.data.splits import build_splits
from simprop.data.synthetic import write_synthetic_tree
from simprop.params import SplitsParams, SyntheticParams


class PeakMemory:
    """Peak summed RSS of this process and its descendants, sampled in a thread (needs psutil)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        try:
            import psutil  # noqa: F401
        except ImportError:
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def ensure_tree(layout: DataLayout, synthetic: SyntheticParams, workers: int) -> float:
    """Generate the raw tree unless one with the same params is there; returns seconds spent."""
    stamp = layout.root / "bench_params.json"
    wanted = json.dumps(synthetic.__dict__, sort_keys=True)
    if layout.raw.exists() and stamp.exists() and stamp.read_text() == wanted:
        return 0.0
    shutil.rmtree(layout.root, ignore_errors=True)
    start = time.perf_counter()
    write_synthetic_tree(layout.raw, synthetic, workers=workers, progress=True)
    check_raw_tree(layout.raw, "the generated tree")
    stamp.write_text(wanted)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/simprop-bench-data", help="data root for the generated tree")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (0 = all cores)")
    parser.add_argument("--sbd", type=int, default=11355, help="SBD train+val images")
    parser.add_argument("--voc", type=int, default=2913, help="VOC2012 segmentation trainval images")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--protocol", default="oslsm", choices=["oslsm", "pfenet"])
    parser.add_argument("--filter", default="oslsm", choices=["oslsm", "pfenet", "none"])
    args = parser.parse_args(argv)

    layout = DataLayout(args.root)
    synthetic = SyntheticParams(num_sbd_images=args.sbd, num_voc_images=args.voc, width=args.width,
                                height=args.height, seed=0)  # fmt: skip
    generate_s = ensure_tree(layout, synthetic, args.workers)
    shutil.rmtree(layout.aug, ignore_errors=True)
    shutil.rmtree(layout.splits, ignore_errors=True)

    cpu_before = os.times()
    with PeakMemory() as memory:
        start = time.perf_counter()
        counts = build_segmentation_class_aug(layout, workers=args.workers, progress=False)
        augment_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics = build_splits(
            layout, SplitsParams(protocol=args.protocol, small_object_filter=args.filter),
            layout.root / "splits.json", workers=args.workers, progress=False,
        )  # fmt: skip
        splits_s = time.perf_counter() - start
    cpu = os.times()
    cpu_s = sum(getattr(cpu, f) - getattr(cpu_before, f) for f in ("user", "system", "children_user", "children_system"))
    load = os.getloadavg()[0]
    result = {
        "images": {"sbd": args.sbd, "voc": args.voc, "unique_labels": counts["voc"] + counts["sbd"],
                   "size": f"{args.width}x{args.height}"},  # fmt: skip
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "generate_s": round(generate_s, 1),
        "augment_s": round(augment_s, 1),
        "splits_s": round(splits_s, 1),
        "augment_plus_splits_s": round(augment_s + splits_s, 1),
        "augment_plus_splits_cpu_s": round(cpu_s, 1),  # all processes; /workers = wall time on idle cores
        "load_average_1min_at_end": round(load, 2),  # other work on the machine inflates wall times
        "peak_rss_mib_process_tree": round(memory.peak / 2**20, 1) if memory.peak else None,
        "max_rss_mib_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "max_rss_mib_largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "split_counts": {f"fold{f}": metrics[f"fold{f}"] for f in range(4)},
        "train_images": metrics["train_images"],
        "test_images": metrics["test_images"],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
