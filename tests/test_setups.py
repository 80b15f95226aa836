"""The two setups: params.yaml is the composed default, `setup=paper` composes a valid paper setup."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from simprop.params import params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def composed(*overrides: str) -> dict:
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_params_yaml_is_the_composed_default_setup():
    assert composed() == yaml.safe_load((ROOT / "params.yaml").read_text()), (
        "params.yaml and conf/config.yaml differ; run python3 conf/sync.py"
    )


def test_paper_setup_composes_to_valid_params():
    params = params_from_dict(composed("setup=paper"))
    assert params.setup == "paper"
    assert params.data.source == "voc" and params.backbone.source == "imagenet"
    assert params.train.image_size == 321 and params.train.epochs == 180 and params.train.augment
    assert params.model.channels == 256 and params.train.batch_size == 8
    assert params.train.lr == pytest.approx(2.5e-3)
    # issue 29: the paper setup decides precision and the encoder conv's form on the machine it runs on
    assert params.train.amp == "auto" and params.evaluate.amp == "auto" and params.model.conv_kernel == "auto"


def test_overrides_apply_on_top_of_a_setup():
    params = params_from_dict(composed("setup=paper", "train.lr=0.005"))
    assert params.train.lr == pytest.approx(0.005)
    assert params.train.epochs == 180


def test_hydra_composition_is_enabled_for_dvc():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in config and "enabled = True" in config


def test_both_setups_use_the_fields_episode_sampling_and_scoring():
    for setup in ("default", "paper"):
        params = params_from_dict(composed(f"setup={setup}"))
        assert params.episodes.class_sampling == "pairs", setup
        assert (params.evaluate.resolution, params.evaluate.void) == ("original", "ignore"), setup
        assert params.splits.small_object_filter == "oslsm", setup
    # the paper's convention is one override away, as the README shows
    params = params_from_dict(composed("setup=paper", "evaluate.resolution=321"))
    assert params.evaluate.resolution == "321" and params.train.image_size == 321


def test_every_training_param_is_a_declared_dependency_of_the_train_stage():
    """`dvc exp run -S train.<key>=...` must rerun training for every key the trainer reads: DVC
    only tracks the params a stage lists; the evaluate stage's jobs are train.variants x train.folds too."""
    import dataclasses

    from simprop.params import TrainParams

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = {p for p in stages["train"]["params"] if isinstance(p, str)}
    # train.seed is not a params key: it is set per replicate from train.seeds
    missing = {f"train.{f.name}" for f in dataclasses.fields(TrainParams) if "derived" not in f.metadata} - listed
    assert not missing, f"dvc.yaml train stage does not list {sorted(missing)}"
    assert {"train.variants", "train.folds", "train.seeds"} <= set(stages["evaluate"]["params"])


def test_the_committed_lock_holds_only_the_stages_of_dvc_yaml():
    """DVC keeps the dvc.lock entries of stages that no longer exist, and it parses and rewrites
    the whole lock around every stage it runs: 40 leftover per-fold entries (`train@canet-0`, from
    before the per-variant stages) made the lock three times its size and cost `dvc repro` ~1 s of
    YAML per stage (README, "Where the time of dvc repro goes")."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert not any("foreach" in stage for stage in stages.values()), "update this test for a foreach stage"
    expected = set(stages)
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked == expected, f"stale {sorted(locked - expected)}, missing {sorted(expected - locked)}"
