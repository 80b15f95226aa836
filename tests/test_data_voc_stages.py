"""The real download, augment, splits and episodes stages with ``data.source: voc`` on a generated
VOC2012 + SBD tree served over HTTP (tests/conftest.py ``serve_files``): the fold lists must be the
ones OSLSM's rule gives, computed here independently from the raw archives' masks, and the
published-lists check must report (loudly) that a generated tree is not PASCAL VOC.

Nothing is mocked: the stage scripts run as subprocesses, as DVC runs them, and log to a real
MLflow store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_data_download import md5, tar_bytes  # tests/ is on sys.path under pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def oslsm_keeps(mask: np.ndarray) -> bool:
    """OSLSM's `_remove_small_objects`, written out here on its own: pad 15 rows/columns at the
    top/left and zeros at the bottom/right to ceil((n + 30) / 32) * 32, nearest resize (scikit-image,
    no anti-aliasing) to ceil((n + 30) / 32), keep when the sum is > 2."""
    from skimage.transform import resize

    h, w = mask.shape
    out_h, out_w = math.ceil((h + 30) / 32), math.ceil((w + 30) / 32)
    padded = np.zeros((out_h * 32, out_w * 32), np.float32)
    padded[15 : 15 + h, 15 : 15 + w] = mask
    return resize(padded, (out_h, out_w), order=0, preserve_range=True, anti_aliasing=False).sum() > 2


def raw_label(raw: Path, image_id: str, voc_masks: set[str]) -> np.ndarray:
    """The class map: VOC2012's palette PNG where VOC has one, else SBD's GTcls."""
    if image_id in voc_masks:
        with Image.open(raw / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{image_id}.png") as im:
            assert im.mode == "P"
            return np.array(im)
    from scipy.io import loadmat

    mat = loadmat(raw / "benchmark_RELEASE" / "dataset" / "cls" / f"{image_id}.mat")
    return np.asarray(mat["GTcls"][0]["Segmentation"][0])


def ids(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    """The four data stages on a generated tree downloaded over HTTP; ``(workdir, raw, outputs)``."""
    from conftest import TINY_SYNTHETIC, FileServer

    from simprop.data.synthetic import write_synthetic_tree
    from simprop.params import SyntheticParams

    raw = tmp_path_factory.mktemp("source") / "raw"
    write_synthetic_tree(raw, SyntheticParams(**TINY_SYNTHETIC), workers=2)
    files = {
        "VOCtrainval_11-May-2012.tar": tar_bytes(raw, ["VOCdevkit"]),
        "benchmark.tgz": tar_bytes(raw, ["benchmark_RELEASE"], mode="w:gz"),
        "train_noval.txt": (raw / "train_noval.txt").read_bytes(),
    }
    server = FileServer(files)
    work = tmp_path_factory.mktemp("work")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"].update(
        source="voc", workers=2,
        voc_url=server.url("VOCtrainval_11-May-2012.tar"), voc_md5=md5(files["VOCtrainval_11-May-2012.tar"]),
        sbd_url=server.url("benchmark.tgz"), sbd_md5=md5(files["benchmark.tgz"]),
        train_noval_url=server.url("train_noval.txt"), train_noval_md5=md5(files["train_noval.txt"]),
    )  # fmt: skip
    params["episodes"].update(num_episodes=30, num_val_episodes=10)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    outputs = {}
    try:
        for stage in ("download", "augment", "splits", "episodes"):
            result = subprocess.run(
                [sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py")],
                cwd=work, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert result.returncode == 0, f"{stage}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            outputs[stage] = result
    finally:
        server.close()
    return work, raw, outputs


def test_fold_lists_are_oslsms_rule_on_the_downloaded_masks(voc_run):
    work, raw, _ = voc_run
    voc = raw / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    sbd = raw / "benchmark_RELEASE" / "dataset"
    voc_val = ids(voc / "val.txt")
    train_pool = (ids(sbd / "train.txt") | ids(sbd / "val.txt") | ids(voc / "train.txt")) - voc_val
    voc_masks = ids(voc / "trainval.txt")
    kept: dict[str, list[int]] = {}
    for image_id in sorted(train_pool | voc_val):
        label = raw_label(raw, image_id, voc_masks)
        kept[image_id] = [c for c in range(1, 21) if oslsm_keeps(label == c)]
    assert any(kept.values())
    for fold in range(4):
        held_out = set(range(5 * fold + 1, 5 * fold + 6))
        expected = {
            "train": {(i, c) for i in train_pool for c in kept[i] if c not in held_out},
            "val": {(i, c) for i in train_pool for c in kept[i] if c in held_out},
            "test": {(i, c) for i in voc_val for c in kept[i] if c in held_out},
        }
        for name, pairs in expected.items():
            lines = (work / "data" / "splits" / f"fold{fold}" / f"{name}.csv").read_text().splitlines()
            assert lines[0] == "image,class"
            got = {(i, int(c)) for i, c in (line.split(",") for line in lines[1:])}
            assert got == pairs, f"fold{fold} {name}.csv: {len(got ^ pairs)} pairs differ from OSLSM's rule"


def test_published_list_check_is_loud_and_recorded(voc_run):
    work, _, outputs = voc_run
    metrics = json.loads((work / "metrics" / "splits.json").read_text())
    published = metrics["published_lists"]
    assert published["checked"] is True and published["matches_all"] is False
    for fold in range(4):
        assert metrics[f"fold{fold}"]["matches_published"] == {"trn": False, "val": False}
        # the md5 of our list, recomputed here as `LC_ALL=C sort` would order the lines
        lines = (work / "data" / "splits" / f"fold{fold}" / "test.csv").read_text().splitlines()[1:]
        text = "".join(sorted(f"{i}__{int(c):02d}\n" for i, c in (line.split(",") for line in lines)))
        assert published[f"fold{fold}"]["val"]["md5"] == hashlib.md5(text.encode()).hexdigest()
        assert published[f"fold{fold}"]["val"]["pairs"] == len(lines)
    err = outputs["splits"].stderr
    assert "WARNING: the fold lists differ from the published OSLSM-protocol lists" in err
    assert "fold2 val (our test.csv)" in err and "published 725 pairs md5 b7d01149959ae68c2147f60963998fdc" in err
    assert "same list" in outputs["splits"].stdout and " NO" in outputs["splits"].stdout

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("simprop")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'splits'")
    assert run.data.tags["published_lists"].startswith("mismatch: fold0 trn, fold0 val")
    assert run.data.metrics["fold3.matches_published.val"] == 0.0
    assert run.data.tags["small_object_filter"] == "oslsm" and run.data.tags["class_sampling"] == "pairs"


def test_episode_stage_on_the_voc_lists(voc_run):
    work, _, _ = voc_run
    provenance = json.loads((work / "data" / "episodes" / "provenance.json").read_text())
    assert provenance["class_sampling"] == "pairs"
    for fold in range(4):
        test_pairs = {tuple(line.split(",")) for line in
                      (work / "data" / "splits" / f"fold{fold}" / "test.csv").read_text().splitlines()[1:]}  # fmt: skip
        lines = (work / "data" / "episodes" / f"fold{fold}" / "test_seed1.csv").read_text().splitlines()
        assert lines[0].endswith("support5,mismatch_class,mismatch1,mismatch2,mismatch3,mismatch4,mismatch5")
        for row in (line.split(",") for line in lines[1:]):
            query, cls, supports, other, mismatches = row[1], row[2], row[3:8], row[8], row[9:]
            assert (query, cls) in test_pairs and all((s, cls) in test_pairs for s in supports)
            assert other != cls and all((m, other) in test_pairs for m in mismatches) and query not in mismatches
