"""The paper's analyses (§3.1): their arithmetic on constructed inputs, and each stage end to end
on a tiny generated data tree with an untrained checkpoint (plumbing, not paper numbers)."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from simprop.analysis.background_similarity import cosine
from simprop.analysis.common import images_by_class, sample_pairs
from simprop.analysis.error_overlap import (
    OverlapCounts,
    SupervisedUnavailable,
    load_supervised,
    run_error_overlap,
    tp_gap,
)
from simprop.analysis.error_similarity import error_region, pair_ratio
from simprop.params import params_from_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))
IMAGE_SIZE = 65
W, H = 48, 40


# --------------------------------------------------------------------------- arithmetic


def test_sample_pairs_is_deterministic_distinct_and_capped():
    by_class = images_by_class([("a", 1), ("b", 1), ("c", 1), ("d", 1), ("a", 2), ("b", 2), ("x", 3)])
    assert by_class == {1: ["a", "b", "c", "d"], 2: ["a", "b"], 3: ["x"]}
    one = sample_pairs(by_class, 3, np.random.default_rng(0))
    two = sample_pairs(by_class, 3, np.random.default_rng(0))
    assert one == two
    assert [p for p in one if p[0] == 2] == [(2, "a", "b")]  # only one pair exists
    ones = [p for p in one if p[0] == 1]
    assert len(ones) == 3 and len(set(ones)) == 3 and all(a != b for _, a, b in ones)
    assert not [p for p in one if p[0] == 3]  # a single image makes no pair
    assert len([p for p in sample_pairs(by_class, 100, np.random.default_rng(0)) if p[0] == 1]) == 6


def test_cosine_and_ratio():
    assert cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine(np.zeros(2), np.ones(2)) == 0.0
    # (Ze(A).Ze(B)) / (Zg(A).Zg(B)) = (1*2 + 2*1) / (2*2) = 1
    assert pair_ratio(np.array([1.0, 2.0]), np.array([2.0, 1.0]), np.array([2.0, 0.0]), np.array([2.0, 0.0])) == 1.0
    assert pair_ratio(np.ones(2), np.ones(2), np.array([1.0, 0.0]), np.array([0.0, 1.0])) is None


def test_error_region_excludes_void():
    pred = torch.tensor([[1, 1, 0, 0]])
    target = torch.tensor([[1, 0, 1, 255]])
    assert error_region(pred, target).tolist() == [[False, True, True, False]]


def test_overlap_counts_on_constructed_masks():
    # class 3 in the left half of a 4x4 label, void in the bottom-right corner
    label = np.zeros((4, 4), dtype=np.uint8)
    label[:, :2] = 3
    label[3, 3] = 255
    fss = np.zeros((4, 4), bool)
    fss[:2, :2] = True  # misses rows 2-3 of the object: FN 4 pixels
    fss[0, 2:] = True  # FP 2 pixels
    fss[3, 3] = True  # on void: not an error
    sup = np.zeros((4, 4), bool)
    sup[:3, :2] = True  # misses row 3: FN 2 pixels, both shared with the FSS model
    sup[0, 3] = sup[1, 3] = True  # FP 2 pixels, 1 shared
    c = OverlapCounts()
    c.add(fss, sup, label, 3)
    assert (c.fn_fss, c.fn_sup, c.fn_both, c.fn_either) == (4, 2, 2, 4)
    assert (c.fp_fss, c.fp_sup, c.fp_both, c.fp_either) == (2, 2, 1, 3)
    s = c.summary()
    assert s["fn_overlap"] == pytest.approx(50.0)
    assert s["fp_overlap"] == pytest.approx(100 / 3)
    assert s["fn_fss_shared_by_supervised"] == pytest.approx(50.0)
    assert s["fp_fss_shared_by_supervised"] == pytest.approx(50.0)
    assert tp_gap(40.0, 75.0) == 35.0
    # pooled over episodes: a second, perfect episode adds nothing
    c.add(label == 3, label == 3, label, 3)
    assert c.summary() == s and c.episodes == 2
    assert OverlapCounts().summary()["fn_overlap"] is None
    with pytest.raises(ValueError, match="shapes differ"):
        c.add(fss[:2], sup, label, 3)


def test_supervised_weights_that_cannot_be_loaded_are_a_skip(tmp_path):
    with pytest.raises(SupervisedUnavailable, match="'none'"):
        load_supervised("none", torch.device("cpu"))
    with pytest.raises(SupervisedUnavailable, match="no such file"):
        load_supervised(str(tmp_path / "missing.pth"), torch.device("cpu"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(SupervisedUnavailable, match="not a torchvision deeplabv3_resnet50"):
        load_supervised(str(bad), torch.device("cpu"))


# --------------------------------------------------------------------------- a tiny data tree


def _write_tree(root: Path) -> None:
    """Fold-0 test classes 1, 2 and training classes 6, 7: 4 images each, objects as rectangles."""
    rng = np.random.default_rng(0)
    images = root / "data" / "raw" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    labels = root / "data" / "SegmentationClassAug"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    pairs = {"train": [], "val": [], "test": []}  # val: no validation pairs needed here
    for cls in (1, 2, 6, 7):
        for k in range(4):
            image_id = f"img_c{cls}_{k}"
            img = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
            label = np.zeros((H, W), np.uint8)
            y, x = rng.integers(2, 12, size=2)
            label[y : y + 20, x : x + 24] = cls
            label[y, x : x + 24] = 255  # void border
            img[label == cls] += np.uint8(120 + 20 * (cls % 3))
            Image.fromarray(img).save(images / f"{image_id}.jpg", quality=95)
            Image.fromarray(label, mode="L").save(labels / f"{image_id}.png")
            pairs["test" if cls <= 5 else "train"].append((image_id, cls))
    splits = root / "data" / "splits" / "fold0"
    splits.mkdir(parents=True)
    for name, rows in pairs.items():
        with (splits / f"{name}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "class"])
            w.writerows(rows)
    episodes = root / "data" / "episodes" / "fold0"
    episodes.mkdir(parents=True)
    with (episodes / "test_seed1.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["episode", "query", "class", "support1", "support2"])
        for e in range(6):
            cls = 1 + e % 2
            w.writerow([e, f"img_c{cls}_{e % 4}", cls, f"img_c{cls}_{(e + 1) % 4}", f"img_c{cls}_{(e + 2) % 4}"])
    # where the file came from, as the episodes stage records it (its readers check the list's digest)
    digest = hashlib.sha256((splits / "test.csv").read_bytes()).hexdigest()
    (episodes.parent / "provenance.json").write_text(json.dumps(
        {"files": {"fold0/test_seed1.csv": {"pool": "splits/fold0/test.csv", "pool_sha256": digest}}}
    ))  # fmt: skip


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from simprop.model.checkpoint import expected_identity, save_checkpoint
    from simprop.model.network import build_model
    from simprop.params import ModelParams

    root = tmp_path_factory.mktemp("repo")
    _write_tree(root)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(backbone_weights="none", backbone_seed=0)  # random backbone, whatever params.yaml says
    raw["splits"]["folds"] = [0]
    raw["train"]["folds"] = [0]
    raw["evaluate"].update(image_size=IMAGE_SIZE, batch_size=4, device="cpu")
    raw["analysis"].update(background_pairs_per_class=3, error_pairs=4, overlap_episodes=4, fold=0, variant="simpropnet")
    raw["tracking"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    torch.manual_seed(0)
    model = build_model("simpropnet", ModelParams(**raw["model"]))
    identity = expected_identity(params_from_dict(raw), "simpropnet", 0, root)  # what training records
    save_checkpoint(root / "models" / "simpropnet" / "fold0" / "seed0" / "best.pt", model, identity=identity, epoch=0,
                    image_size=IMAGE_SIZE)  # fmt: skip
    return root


@pytest.fixture(autouse=True)
def _quiet_tools(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def _params(repo: Path):
    return params_from_dict(yaml.safe_load((repo / "params.yaml").read_text()))


def _runs(repo: Path, stage: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("simprop")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == stage]


# --------------------------------------------------------------------------- stages end to end


def test_background_similarity_stage(repo, capsys):
    import analysis_background

    assert analysis_background.main(["--params", str(repo / "params.yaml"), "--root", str(repo)]) == 0
    metrics = json.loads((repo / "metrics" / "analysis" / "background_similarity.json").read_text())
    assert metrics["classes"] == 4 and metrics["pairs"] + metrics["pairs_skipped_empty_region"] == 12
    assert "RANDOM" in metrics["backbone"]
    for row in metrics["per_class"]:
        assert -1.0 <= row["fg_mean"] <= 1.0 and -1.0 <= row["bg_mean"] <= 1.0
    report = repo / "reports" / "analysis"
    assert (report / "background_similarity.png").stat().st_size > 1000
    assert "| aeroplane |" in (report / "background_similarity.md").read_text()
    assert "background higher for" in capsys.readouterr().out
    (run,) = _runs(repo, "analysis_background")
    assert run.info.status == "FINISHED" and "fg_cosine_mean" in run.data.metrics


def test_error_similarity_stage(repo):
    import analysis_error_similarity

    assert analysis_error_similarity.main(["--params", str(repo / "params.yaml"), "--root", str(repo)]) == 0
    metrics = json.loads((repo / "metrics" / "analysis" / "error_similarity.json").read_text())
    assert metrics["pairs_sampled"] == 4 and metrics["pairs"] + metrics["pairs_without_errors"] == 4
    assert metrics["paper"] == {"ratio_mean": 0.87, "ratio_std": 0.25}
    if metrics["pairs"]:
        assert metrics["ratio_mean"] > 0  # ReLU features: inner products are non-negative
    assert (repo / "reports" / "analysis" / "error_similarity.md").is_file()
    (run,) = _runs(repo, "analysis_error_similarity")
    assert run.info.status == "FINISHED" and run.data.tags["variant"] == "simpropnet"


def test_error_similarity_without_a_checkpoint_fails_clearly(repo, tmp_path, capsys):
    import analysis_error_similarity

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["analysis"]["variant"] = "canet"  # not trained in this tree
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    rc = analysis_error_similarity.main(["--params", str(tmp_path / "params.yaml"), "--root", str(repo)])
    assert rc == 2
    assert "models/canet/fold0/seed0/best.pt: checkpoint not found; train canet first" in capsys.readouterr().err


def test_error_overlap_stage_is_skipped_without_supervised_weights(repo, capsys):
    import analysis_error_overlap

    assert analysis_error_overlap.main(["--params", str(repo / "params.yaml"), "--root", str(repo)]) == 0
    metrics = json.loads((repo / "metrics" / "analysis" / "error_overlap.json").read_text())
    assert metrics["skipped"] is True and "'none'" in metrics["reason"]
    assert "skipped" in capsys.readouterr().out
    report = repo / "reports" / "analysis"
    assert "Skipped" in (report / "error_overlap.md").read_text()
    assert (report / "error_overlap.csv").read_text().startswith("class_id,class,episodes")
    (run,) = _runs(repo, "analysis_error_overlap")
    assert run.info.status == "FINISHED" and run.data.tags["skipped"] == "true"


def test_error_overlap_against_a_perfect_supervised_model(repo):
    """A 'supervised model' that returns the ground truth makes no errors: overlaps are 0, the
    TP gap is 100 - the few-shot mIoU."""
    from simprop.data.io import read_label
    from simprop.segment.inputs import read_image

    labels = repo / "data" / "SegmentationClassAug"
    images = repo / "data" / "raw" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    truth = {read_image(images / f"{p.stem}.jpg").tobytes(): read_label(p) for p in labels.glob("*.png")}

    def oracle(image: np.ndarray) -> np.ndarray:  # the tiny tree's images all differ
        return truth[np.ascontiguousarray(image).tobytes()]

    result = run_error_overlap(_params(repo), repo, device="cpu", supervised=oracle)
    assert result["skipped"] is False and result["episodes"] == 4
    assert result["supervised_miou"] == pytest.approx(100.0)
    assert result["tp_gap"] == pytest.approx(100.0 - result["fss_miou"])
    assert result["fn_overlap"] in (0.0, None) and result["fp_overlap"] in (0.0, None)
    assert {r["class"] for r in result["per_class"]} == {"aeroplane", "bicycle"}


def test_the_analyses_read_the_feature_cache_and_agree_with_the_backbone(repo, tmp_path, monkeypatch):
    """With the features stage's cache for this backbone at evaluate.image_size, the analyses read
    it instead of running ResNet-50 on their images; the numbers agree up to its float16 rounding."""
    import shutil

    from simprop.analysis.background_similarity import run_background_similarity
    from simprop.analysis.error_similarity import run_error_similarity
    from simprop.engine.features import build_feature_cache
    from simprop.model.encoder import Backbone

    root = tmp_path / "repo"
    shutil.copytree(repo, root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"].update(image_size=IMAGE_SIZE, cache_backbone_features=True, augment=False, variants=["simpropnet"])
    params = params_from_dict(raw)
    before = run_background_similarity(params, root, device="cpu"), run_error_similarity(params, root, device="cpu")
    build_feature_cache(params, root, torch.device("cpu"))

    calls = []
    forward = Backbone.forward
    monkeypatch.setattr(Backbone, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    after = run_background_similarity(params, root, device="cpu"), run_error_similarity(params, root, device="cpu")
    assert not calls, "the analyses ran the backbone although the cache holds its features"
    for key in ("fg_cosine_mean", "bg_cosine_mean"):
        assert after[0][key] == pytest.approx(before[0][key], abs=1e-3)
    assert after[0]["pairs"] == before[0]["pairs"] and after[1]["pairs"] == before[1]["pairs"]
    if before[1]["pairs"]:
        assert after[1]["ratio_mean"] == pytest.approx(before[1]["ratio_mean"], abs=1e-2)

    raw["evaluate"]["image_size"] = IMAGE_SIZE + 8  # a cache of another size is not read
    run_background_similarity(params_from_dict(raw), root, device="cpu")
    assert calls
