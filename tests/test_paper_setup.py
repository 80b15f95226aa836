"""The paper setup's code path, run: `setup=paper` composed by Hydra as `dvc exp run -S setup=paper`
composes it, scaled down by overrides only, through the real stage entry points (``stages/*.py``
``main``, in this process to save each stage's start-up; the DVC wiring of the same stages is
what tests/test_pipeline.py runs with `dvc repro`).

What stays as the paper setup has it: 321 x 321 training and evaluation inputs, CANet's support
augmentation, no backbone-feature cache (backbone features computed on the fly), the 256-channel
network, the OSLSM protocol and pair sampling, scoring at the original label size. What the
overrides scale down: the generated dataset instead of VOC, a random ResNet-50 file instead of the
ImageNet weights (no download), one fold, the canet and simpropnet variants, one training step of
batch 2, two 1-shot test episodes of one test set (k-shot runs the same code at any input size,
and each shot count adds the network's and the prototype matcher's passes over the episodes), no
identical-input pass (the same runner code as the test episodes) and no analyses.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml
from test_setups import composed  # tests/ is on sys.path under pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("canet", "simpropnet")


def paper_overrides(backbone_file: Path) -> list[str]:
    """`-S` overrides that shrink the paper setup without changing its code path."""
    return [
        "setup=paper",
        "data.source=synthetic",
        "data.workers=2",
        "data.synthetic.num_sbd_images=120",
        "data.synthetic.num_voc_images=240",
        "splits.folds=[0]",
        "episodes.test_seeds=[1]",
        "episodes.num_episodes=2",
        "episodes.num_val_episodes=1",
        "episodes.max_shots=1",
        "evaluate.shots=[1]",
        f"backbone.source={backbone_file}",
        f"train.variants=[{','.join(VARIANTS)}]",
        "train.folds=[0]",
        "train.epochs=1",
        "train.iterations_per_epoch=1",
        "train.batch_size=2",
        "train.device=cpu",
        "evaluate.device=cpu",
        "evaluate.identical_input=false",
        "report.num_qualitative=1",
        "analysis.supervised_weights=none",
    ]


def stage_main(name: str):
    """``main`` of ``stages/<name>.py``, the DVC stage's entry point."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO_ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def paper_repo(tmp_path_factory) -> tuple[Path, dict]:
    import torch
    import torchvision

    tmp = tmp_path_factory.mktemp("paper")
    backbone_file = tmp / "random_resnet50.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), backbone_file)
    params = composed(*paper_overrides(backbone_file))
    repo = tmp / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    steps = [(name, []) for name in ("download", "augment", "splits", "episodes")]
    steps += [("backbone", []), ("features", [])]
    steps += [(stage, ["--variant", v, "--fold", "0"]) for stage in ("train", "evaluate") for v in VARIANTS]
    steps += [("report", [])]
    cwd, uri = Path.cwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(repo)  # stages read params.yaml and write their outputs relative to the repository root
    try:
        for name, argv in steps:
            main = stage_main(name)
            assert main(argv) == 0, f"stage {name} {argv} failed"
    finally:
        os.chdir(cwd)
        if uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri
    return repo, params


def test_the_composed_params_are_the_paper_setup(paper_repo):
    _, params = paper_repo
    assert params["setup"] == "paper"
    assert params["train"]["image_size"] == params["evaluate"]["image_size"] == 321
    assert params["train"]["augment"] is True and params["train"]["cache_backbone_features"] is False
    assert params["model"]["channels"] == 256 and params["model"]["dropout"] == 0.5
    assert params["splits"]["protocol"] == params["splits"]["small_object_filter"] == "oslsm"
    assert params["episodes"]["class_sampling"] == "pairs"
    assert params["evaluate"]["resolution"] == "original" and params["evaluate"]["void"] == "ignore"


def test_paper_setup_trains_and_evaluates_both_variants(paper_repo):
    repo, params = paper_repo
    manifest = json.loads((repo / "data" / "features" / "manifest.json").read_text())
    assert manifest["enabled"] is False  # no feature cache: backbone features on the fly, as augmentation needs
    for variant in VARIANTS:
        train = json.loads((repo / "metrics" / "train" / variant / "fold0" / "seed0.json").read_text())
        assert train["steps"] == 1
        checkpoint = torch_load(repo / "models" / variant / "fold0" / "seed0" / "best.pt")
        assert checkpoint["model_params"]["channels"] == 256
        record = json.loads((repo / "metrics" / "evaluate" / variant / "fold0" / "seed0.json").read_text())
        assert record["setup"] == "paper" and record["image_size"] == 321 and record["resolution"] == "original"
        assert record["class_sampling"] == "pairs" and record["void"] == "ignore"
        entry = record["shot1"]
        assert 0.0 <= entry["miou_mean"] <= 100.0 and entry["seed1"]["episodes"] == 2
        assert 1 <= entry["classes_scored"] <= 5 and entry["seed1"]["classes_in_mean"] == 5
        assert record["mismatched"]["seed1"]["episodes"] == 2  # the support-use control ran at 321 too
        assert (repo / "outputs" / "evaluate" / variant / "fold0" / "seed0" / "qualitative.png").is_file()
    tables = (repo / "reports" / "tables.md").read_text()
    assert "| setup | `paper` |" in tables and "network input 321x321" in tables


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)
