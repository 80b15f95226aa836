"""``reports/figures/``: per-class IoU per variant, the training curves and the qualitative montage.

Optional inputs, for every ``(variant, fold, training seed)`` in params (paths from
:class:`~simprop.layout.RunLayout`): the training curves ``plots/train/{loss,val}/<variant>/fold<i>/seed<s>.csv``
and the panel ``outputs/evaluate/<variant>/fold<i>/seed<s>/qualitative.png``; a figure without them says so.
"""

from __future__ import annotations

import math
from pathlib import Path

from simprop import paper
from simprop.engine.metrics import mean_std
from simprop.engine.visualize import save_figure
from simprop.layout import RunLayout
from simprop.params import Params
from simprop.voc import class_id, split_name


def class_iou_by_variant(params: Params, results: dict, shots: int = 1) -> dict[str, dict[str, float]]:
    """``{variant: {class name: IoU %}}``, mean over test sets and training seeds, classes from each
    run's fold."""
    values: dict[str, dict[str, list[float]]] = {}
    for (variant, _fold, _seed), res in results.items():
        entry = res.shot(shots)
        if not entry:
            continue
        means = entry.get("class_iou_mean")
        if means is None:
            seeds = [v["class_iou"] for k, v in entry.items() if k.startswith("seed") and isinstance(v, dict)]
            names = {n for s in seeds for n in s}
            means = {n: mean_std([s.get(n) for s in seeds])[0] for n in names}
        for name, value in means.items():
            if value is not None and not math.isnan(value):
                values.setdefault(variant, {}).setdefault(name, []).append(value)
    return {v: {n: sum(x) / len(x) for n, x in classes.items()} for v, classes in values.items()}


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global figure or backend state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_per_class_iou(params: Params, results: dict, path: Path) -> Path:
    shots = 1 if 1 in params.evaluate.shots else min(params.evaluate.shots)
    data = class_iou_by_variant(params, results, shots)
    names = sorted({n for d in data.values() for n in d}, key=class_id)
    fig = _new_figure(max(8.0, 0.55 * len(names) + 2), 4.5)
    ax = fig.add_subplot()
    if not names:
        ax.text(0.5, 0.5, "no per-class IoU in the metrics files", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = 0.8 / max(1, len(data))
        for i, (variant, values) in enumerate(data.items()):
            xs = [j + (i - (len(data) - 1) / 2) * width for j, n in enumerate(names) if n in values]
            ys = [values[n] for n in names if n in values]
            ax.bar(xs, ys, width=width, label=paper.method_label(variant))
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel("IoU (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Per-class IoU, {shots}-shot, mean over test sets and training seeds ({params.splits.protocol}, {params.data.source})")
        ax.legend(fontsize="small", ncols=min(5, len(data)))
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, dpi=fig.dpi)


def curve_paths(root: Path, variant: str, fold: int, seed: int) -> tuple[Path | None, Path | None]:
    """(loss, val) curves of a training run (:class:`~simprop.layout.RunLayout`; one folder per
    curve, which DVC plots overlays), each ``None`` when absent."""
    layout = RunLayout(root, variant, fold, seed)
    return tuple(p if p.is_file() else None for p in (layout.loss_curve, layout.val_curve))  # type: ignore[return-value]


def _read_curve(path: Path | None, x: str, y: str):
    if path is None:
        return None
    import pandas as pd

    frame = pd.read_csv(path)
    if x not in frame or y not in frame or frame.empty:
        return None
    return frame[x].to_numpy(), frame[y].to_numpy(dtype=float)


def plot_training_curves(params: Params, root: Path, path: Path) -> Path:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    folds = list(params.train.folds)
    fig = _new_figure(11, 2.8 * len(folds) + 0.5)
    axes = fig.subplots(len(folds), 2, squeeze=False)
    colours = {v: f"C{i}" for i, v in enumerate(params.train.variants)}
    any_curve = False
    for row, fold in enumerate(folds):
        ax_loss, ax_val = axes[row]
        for variant, seed in ((v, s) for v in params.train.variants for s in params.train.seeds):
            # every training seed in the variant's colour, labelled once
            label = paper.method_label(variant) if seed == params.train.seeds[0] else None
            loss_path, val_path = curve_paths(root, variant, fold, seed)
            loss = _read_curve(loss_path, "step", "loss")
            if loss is not None:
                steps, values = loss
                window = max(1, len(values) // 50)
                if window > 1:  # moving average: per-step loss is noisy
                    values = np.convolve(values, np.ones(window) / window, mode="valid")
                    steps = steps[window - 1 :]
                ax_loss.plot(steps, values, color=colours[variant], label=label, lw=1, alpha=0.8)
                any_curve = True
            val = _read_curve(val_path, "epoch", "val_miou")
            if val is not None:
                ax_val.plot(*val, marker="o", ms=3, color=colours[variant], label=label, alpha=0.8)
                any_curve = True
        ax_loss.set_title(f"{split_name(fold)}: training loss")
        ax_loss.set_xlabel("step")
        ax_val.set_title(f"{split_name(fold)}: validation mIoU")
        ax_val.set_xlabel("epoch")
        ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_val.set_ylabel("mIoU (%)")
        for ax in (ax_loss, ax_val):
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize="x-small")
    if not any_curve:
        fig.suptitle("no training curves found under plots/train/")
    return save_figure(fig, path, dpi=fig.dpi)


def qualitative_montage(params: Params, root: Path, path: Path, max_width: int = 1200) -> Path:
    """One qualitative panel per variant, all from the same fold (the same episodes) and the first
    training seed, stacked."""
    from PIL import Image, ImageDraw

    panels = []
    for variant in params.train.variants:
        for fold in params.train.folds:
            src = RunLayout(root, variant, fold, params.train.seeds[0]).qualitative
            if src.is_file():
                panels.append((f"{paper.method_label(variant)}, {split_name(fold)}", src))
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    if not panels:
        img = Image.new("RGB", (640, 80), "white")
        ImageDraw.Draw(img).text((10, 30), "no qualitative panels in outputs/evaluate/", fill="black")
        img.save(path)
        return path
    images = []
    for caption, src in panels:
        with Image.open(src) as im:
            im = im.convert("RGB")
            if im.width > max_width:
                im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
            images.append((caption, im.copy()))
    caption_h = 24
    width = max(im.width for _, im in images)
    height = sum(im.height + caption_h for _, im in images)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for caption, im in images:
        draw.text((8, y + 6), caption, fill="black")
        canvas.paste(im, (0, y + caption_h))
        y += im.height + caption_h
    canvas.save(path)
    return path
