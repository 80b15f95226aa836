"""Hyperparameter sweep on validation episodes only (test episodes are never read), as run on the lent H100 to choose the defaults; OUT and SWEEP_WORK set where results and data go."""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from simprop.params import load_params

OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path(os.environ.get("SWEEP_WORK", "/tmp/sweep"))

def override(params, **kv):
    for key, v in kv.items():
        section, name = key.split(".", 1)
        if "." in name:  # data.synthetic.x
            sub, leaf = name.split(".")
            sec = getattr(params, section); inner = getattr(sec, sub)
            params = dataclasses.replace(params, **{section: dataclasses.replace(sec, **{sub: dataclasses.replace(inner, **{leaf: v})})})
            continue
        sec = getattr(params, section)
        params = dataclasses.replace(params, **{section: dataclasses.replace(sec, **{name: v})})
    return params

def data_root(name, size, sbd):
    return WORK / f"data_{name}_{size}"

def build(root: Path, params, device):
    from simprop.data.augment import build_segmentation_class_aug
    from simprop.data.download import prepare_raw
    from simprop.data.episodes import build_episodes
    from simprop.data.layout import DataLayout
    from simprop.data.splits import build_splits
    from simprop.engine.features import build_feature_cache
    from simprop.model.backbone import materialise_backbone
    layout = DataLayout(root / "data")
    if not (root / "data" / "episodes").exists():
        prepare_raw(layout, params.data, workers=8, progress=False)
        build_segmentation_class_aug(layout, workers=8, progress=False)
        build_splits(layout, params.splits, root / "splits.json", workers=8, progress=False)
        build_episodes(layout, params.splits.folds, params.episodes)
    old = os.getcwd(); os.chdir(root)
    try:
        if not (root / params.backbone.path).exists():
            materialise_backbone(params, root)
        if not (root / "data" / "features" / "manifest.json").exists():
            build_feature_cache(params, root, device)
    finally:
        os.chdir(old)

def mismatch(episodes, pairs, fold, shots, seed=99):
    from simprop.data.io import Episode
    from simprop.voc import fold_classes
    rng = np.random.default_rng([seed, fold])
    classes = fold_classes(fold); by = {}
    for img, c in pairs: by.setdefault(c, set()).add(img)
    out = []
    for e in episodes:
        c2 = [c for c in classes if c != e.cls][int(rng.integers(4))]
        cands = sorted(i for i in by[c2] if i != e.query and i not in by[e.cls]) or sorted(i for i in by[c2] if i != e.query)
        picks = rng.choice(len(cands), size=min(shots, len(cands)), replace=False)
        out.append(Episode(e.index, e.query, e.cls, tuple(cands[i] for i in picks), support_class=c2))
    return out

def worker(cfg):
    torch.set_num_threads(1)
    from simprop.data.datasets import DataPaths, ImageStore
    from simprop.data.io import read_episodes, read_pairs
    from simprop.engine.inference import EpisodeRunner
    from simprop.engine.matcher import PrototypeMatcher
    from simprop.evaluate.controls import identical_input_episodes
    from simprop.model.checkpoint import load_checkpoint
    from simprop.train.trainer import Trainer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = override(load_params(REPO / "params.yaml"), **cfg["set"])
    params = override(params, **{"train.device": device.type, "evaluate.device": device.type})
    shared = Path(cfg["data_root"])
    run_root = WORK / "runs" / cfg["id"]
    (run_root / "models").mkdir(parents=True, exist_ok=True)
    for link, target in ((run_root / "data", shared / "data"), (run_root / "backbone", shared / "backbone")):
        if not link.exists(): link.symlink_to(target)
    fold = cfg["fold"]; t0 = time.time()
    os.chdir(run_root)
    trainer = Trainer(params, cfg["variant"], fold, run_root)
    summary = trainer.run()
    ttrain = time.time() - t0
    model, _ = load_checkpoint(trainer.paths.best, map_location=device)
    paths = DataPaths(run_root / "data"); store = ImageStore(paths, params.evaluate.image_size)
    val1 = read_episodes(paths.val_episode_file(fold), 1); val5 = read_episodes(paths.val_episode_file(fold), 5)
    pairs = read_pairs(paths.split(fold, "val"))
    r = EpisodeRunner(model, store, device, 32, trainer.cache)
    m = PrototypeMatcher(store, device, model.backbone_features, 32, trainer.cache)
    res = dict(cfg, val_best=summary["best_val_miou"], best_epoch=summary["best_epoch"],
               v1=r.evaluate(val1).summary()["miou"], vmm=r.evaluate(mismatch(val1, pairs, fold, 1)).summary()["miou"],
               v5=r.evaluate(val5).summary()["miou"], vid=r.evaluate(identical_input_episodes(pairs[:300])).summary()["miou"],
               m1=m.evaluate(val1).summary()["miou"], m5=m.evaluate(val5).summary()["miou"], t=round(ttrain, 1),
               curve=[round(v, 1) for _, v in trainer_history(trainer)])
    return res

def trainer_history(trainer):
    import csv
    with open(trainer.paths.val_curve) as fh:
        return [(int(r["epoch"]), float(r["val_miou"])) for r in csv.DictReader(fh)]

def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        cfg = json.loads(sys.argv[2])
        try:
            res = worker(cfg)
        except Exception as exc:
            import traceback
            res = dict(cfg, error=traceback.format_exc()[-1500:])
        with open(OUT / "sweep.jsonl", "a") as fh: fh.write(json.dumps(res) + "\n")
        return
    plan = json.loads(Path(sys.argv[1]).read_text())
    OUT.mkdir(parents=True, exist_ok=True); WORK.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_params(REPO / "params.yaml")
    t0 = time.time()
    shares = plan.get("share_data", {})
    for name, spec in plan["data"].items():
        p = override(base, **spec)
        root = WORK / f"data_{name}"; root.mkdir(parents=True, exist_ok=True)
        if name in shares and not (root / "data").exists():
            (root / "data").mkdir()
            for sub in ("raw", "SegmentationClassAug", "splits", "episodes"):
                (root / "data" / sub).symlink_to(WORK / f"data_{shares[name]}" / "data" / sub)
        build(root, p, device)
        print(f"data {name} built at {time.time()-t0:.0f}s", flush=True)
    jobs = []
    for i, cfg in enumerate(plan["runs"]):
        cfg = dict(cfg, id=f"r{i:03d}", data_root=str(WORK / f"data_{cfg['data']}"))
        cfg["set"] = {**plan["data"][cfg["data"]], **cfg["set"]}
        jobs.append(cfg)
    running = []
    limit = int(plan.get("parallel", 12)); deadline = t0 + float(plan.get("deadline_s", 400))
    while jobs or running:
        while jobs and len(running) < limit and time.time() < deadline:
            cfg = jobs.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"}))
        if time.time() >= deadline: jobs = []
        running = [p for p in running if p.poll() is None]
        if time.time() > deadline + 60:
            for p in running: p.kill()
            break
        time.sleep(0.5)
    print(f"done at {time.time()-t0:.0f}s", flush=True)

if __name__ == "__main__":
    main()
