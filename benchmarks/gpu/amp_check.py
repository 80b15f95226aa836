"""bf16 autocast vs fp32: 50 training steps (loss curves) and one checkpoint's evaluation mIoU."""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "tests")); sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_helpers import make_episodes
from simprop.model import build_model, dual_prediction_loss
from simprop.params import ModelParams
from simprop.precision import autocast

OUT = Path(os.environ.get("OUT", "/tmp/out"))
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
size = int(os.environ.get("AMP_SIZE", "321")); channels = int(os.environ.get("AMP_CHANNELS", "256")); steps = int(os.environ.get("AMP_STEPS", "50"))

def curve(variant, amp):
    torch.manual_seed(0)
    model = build_model(variant, ModelParams(channels=channels, dropout=0.0), init_seed=0).to(dev).train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=2.5e-3, momentum=0.9, weight_decay=5e-4)
    losses = []
    for step in range(steps):
        q, s, sm, ql, sl = (t.to(dev) for t in make_episodes(8, size=(size, size), shots=1, seed=step))
        with autocast(dev, amp):
            out = model(q, s, sm)
            loss = dual_prediction_loss(out, ql, sl if "support" in out else None)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        losses.append(float(loss.detach()))
    return np.array(losses)

report = {"device": str(torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"), "size": size, "channels": channels, "steps": steps}
for variant in ("canet", "simpropnet"):
    t = time.time(); fp32 = curve(variant, False); t32 = time.time() - t
    t = time.time(); bf16 = curve(variant, True); t16 = time.time() - t
    rel = np.abs(bf16 - fp32) / fp32
    report[variant] = {"fp32": fp32.round(5).tolist(), "bf16": bf16.round(5).tolist(), "max_rel_diff": float(rel.max()),
                       "mean_rel_diff": float(rel.mean()), "final_fp32": float(fp32[-5:].mean()), "final_bf16": float(bf16[-5:].mean()),
                       "seconds_fp32": t32, "seconds_bf16": t16}
    print(variant, {k: v for k, v in report[variant].items() if k not in ("fp32", "bf16")}, flush=True)

if os.environ.get("AMP_EVAL", "1") == "1":
    import sweep
    from simprop.params import load_params
    from simprop.training import Trainer
    from simprop.model import load_checkpoint
    from simprop.evaluation import EpisodeRunner
    from simprop.datasets import DataPaths, ImageStore, read_episodes
    params = sweep.override(load_params(REPO / "params.yaml"), **{"train.device": dev.type, "evaluate.device": dev.type,
                            **json.loads(os.environ.get("AMP_EVAL_SET", "{}"))})
    root = Path(os.environ.get("SWEEP_WORK", "/tmp/sweep")) / "amp_eval"; root.mkdir(parents=True, exist_ok=True)
    sweep.build(root, params, dev)
    os.chdir(root)
    trainer = Trainer(params, "simpropnet", 0, root); trainer.run()
    model, _ = load_checkpoint(trainer.paths.best, map_location=dev)
    paths = DataPaths(root / "data"); store = ImageStore(paths, params.evaluate.image_size)
    ev = {}
    for amp in (False, True):
        runner = EpisodeRunner(model, store, dev, 32, trainer.cache, amp=amp)
        ev["bf16" if amp else "fp32"] = [runner.evaluate(read_episodes(paths.episode_file(0, f"test_seed{s}"), 1)).summary()["miou"] for s in params.episodes.test_seeds]
    ev["max_abs_diff"] = float(np.max(np.abs(np.array(ev["bf16"]) - np.array(ev["fp32"]))))
    report["evaluation"] = ev
    print("evaluation", ev, flush=True)
(OUT / "amp_check.json").write_text(json.dumps(report, indent=1))
