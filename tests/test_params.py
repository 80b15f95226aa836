"""params.yaml validation: bad values fail before any work, naming the key."""

import re
from pathlib import Path

import pytest
import yaml

from simprop.errors import ParamsError
from simprop.params import load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def committed() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.setup == "default"
    assert params.data.source == "synthetic"
    assert params.flat()["train.lr"] == pytest.approx(committed()["train"]["lr"])
    assert params.flat()["model.channels"] == committed()["model"]["channels"]


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda p: p["train"].pop("lr"), "train.lr"),
        (lambda p: p["train"].__setitem__("lrr", 0.1), "train.lrr"),
        (lambda p: p["data"].__setitem__("source", "coco"), "data.source"),
        (lambda p: p["splits"].__setitem__("protocol", "hsnet"), "splits.protocol"),
        (lambda p: p["splits"].__setitem__("folds", [0, 4]), "splits.folds"),
        (lambda p: p["train"].__setitem__("folds", [-1]), "train.folds"),
        (lambda p: p["evaluate"].__setitem__("shots", [0]), "evaluate.shots"),
        (lambda p: p["train"].__setitem__("variants", ["canet", "pspnet"]), "train.variants"),
        (lambda p: p["train"].__setitem__("batch_size", "eight"), "train.batch_size"),
        (lambda p: p["train"].__setitem__("device", "tpu"), "train.device"),
        (lambda p: p["episodes"].__setitem__("val_seed", 1), "episodes.val_seed"),
        (lambda p: p["data"]["synthetic"].pop("seed"), "data.synthetic.seed"),
        (lambda p: p["evaluate"].__setitem__("shots", [1, 7]), "evaluate.shots"),
        (lambda p: p["train"].__setitem__("projection_lr_scale", -0.1), "train.projection_lr_scale"),
        (lambda p: p["analysis"].__setitem__("batch_size", 0), "analysis.batch_size"),
    ],
)
def test_bad_params_name_the_key(edit, key):
    raw = committed()
    edit(raw)
    with pytest.raises(ParamsError) as info:
        params_from_dict(raw)
    assert key in str(info.value)


def test_exponent_without_dot_is_a_number():
    raw = committed()
    raw["train"]["weight_decay"] = "5e-4"  # YAML 1.1 reads this as a string
    assert params_from_dict(raw).train.weight_decay == pytest.approx(5e-4)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "params.yaml")


def test_cli_reports_bad_params(tmp_path, capsys):
    from simprop.cli import main

    raw = committed()
    raw["train"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["params", "--params", str(tmp_path / "params.yaml")]) == 2
    assert "train.lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "section, key, good, bad",
    [
        ("episodes", "class_sampling", ["pairs", "uniform"], ["images", 1]),
        ("evaluate", "resolution", ["original", "321", 321], ["320", 320, "500"]),
        ("evaluate", "void", ["ignore", "background"], ["foreground", True]),
    ],
)
def test_protocol_options_are_validated(section, key, good, bad):
    """The sampling and scoring conventions (issue 10): every allowed value loads, others name the key."""
    for value in good:
        raw = committed()
        raw[section][key] = value
        assert getattr(getattr(params_from_dict(raw), section), key) == str(value)
    for value in bad:
        raw = committed()
        raw[section][key] = value
        with pytest.raises(ParamsError, match=f"{section}.{key}"):
            params_from_dict(raw)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "lr", float("nan")),
        ("train", "lr", float("inf")),
        ("train", "weight_decay", float("nan")),
        ("train", "projection_lr_scale", float("inf")),
        ("train", "momentum", float("-inf")),
        ("model", "dropout", float("nan")),
        ("backbone", "residual_scale", float("nan")),
        ("train", "lr", "nan"),  # a string YAML did not read as a number
        ("data", "stall_timeout_s", float("inf")),
    ],
)
def test_non_finite_numbers_are_rejected_naming_the_key(section, key, value):
    raw = committed()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=rf"{section}\.{key} must be a finite number"):
        params_from_dict(raw)


def test_yaml_nan_and_inf_in_a_params_file_are_rejected(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  lr: 0.05\n", "  lr: .nan\n")
    assert "lr: .nan" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"train\.lr must be a finite number, got nan"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("data", "root", "../elsewhere/data"),
        ("data", "root", "/tmp/simprop-data"),
        ("data", "root", "data/../../x"),
        ("data", "root", "~/data"),
        ("backbone", "path", "../resnet50.pt"),
        ("backbone", "path", "/tmp/resnet50.pt"),
    ],
)
def test_output_paths_must_stay_inside_the_repository(section, key, value):
    with pytest.raises(ParamsError, match=rf"{section}\.{key} = .* leaves the repository"):
        params_from_dict(committed_with(section, key, value))


@pytest.mark.parametrize(
    "section, key, value, phrase",
    [
        ("data", "root", ".git", "inside .git/"),
        ("data", "root", ".git/data", "inside .git/"),
        ("data", "root", "./.dvc/cache", "inside .dvc/"),
        ("data", "root", ".", "the repository root"),
        ("data", "root", "data/..", "the repository root"),
        ("backbone", "path", ".dvc/resnet50.pt", "inside .dvc/"),
    ],
)
def test_output_paths_must_not_be_git_or_dvc_folders(section, key, value, phrase):
    """``data.root: .git`` once passed validation, and the download stage then wrote into .git/."""
    with pytest.raises(ParamsError, match=rf"{section}\.{key} = .* is {phrase}.*give a folder of its own"):
        params_from_dict(committed_with(section, key, value))


def committed_with(section: str, key: str, value) -> dict:
    raw = committed()
    raw[section][key] = value
    return raw


def test_read_only_inputs_may_live_elsewhere():
    raw = committed()
    raw["data"]["root"] = "data/../data2"  # normalises to a path inside the repository
    raw["model"]["backbone_weights"] = "/opt/weights/resnet50-0676ba61.pth"
    raw["analysis"]["supervised_weights"] = "../shared/deeplabv3.pth"
    raw["backbone"]["source"] = "/opt/weights/resnet50-0676ba61.pth"
    params = params_from_dict(raw)
    assert params.model.backbone_weights.startswith("/opt/")
    assert params.analysis.supervised_weights.startswith("../")


@pytest.mark.parametrize("value, phrase", [(0, "must be > 0"), (-1.0, "must be > 0"), ("soon", "must be a number")])
def test_stall_timeout_must_be_a_positive_number(value, phrase):
    raw = committed()
    assert raw["data"]["stall_timeout_s"] == 60.0  # the committed default
    raw["data"]["stall_timeout_s"] = value
    with pytest.raises(ParamsError, match=rf"data\.stall_timeout_s.*{phrase}"):
        params_from_dict(raw)


def test_training_seeds_are_a_list_and_train_seed_is_set_per_replicate(tmp_path):
    """Issue 26: train.seeds lists the training replicates; train.seed is derived per replicate, and
    writing it in params.yaml says what to write instead."""
    import yaml

    from simprop.params import ParamsError, load_params

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert params.train.seeds == (0, 1, 2) and params.train.seed == 0
    assert params.for_seed(2).train.seed == 2 and params.for_seed(2).train.seeds == (0, 1, 2)
    assert "seed" not in params.to_dict()["train"]
    with pytest.raises(ParamsError, match=r"train.seeds: seed 7 is not in \[0, 1, 2\]"):
        params.for_seed(7)
    for value, message in (([], "give at least one training seed"), ([1, 1], "must be distinct"), ([-1], ">= 0")):
        raw["train"]["seeds"] = value
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(ParamsError, match=f"train.seeds: .*{re.escape(message)}"):
            load_params(tmp_path / "p.yaml")
    raw["train"]["seeds"] = [0]
    raw["train"]["seed"] = 3
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"'train.seed' is not a params key: .*write train.seeds: \[N\]"):
        load_params(tmp_path / "p.yaml")


@pytest.mark.parametrize("value", [True, False, "auto"])
@pytest.mark.parametrize("section", ["train", "evaluate"])
def test_amp_takes_true_false_or_auto(section, value):
    assert getattr(params_from_dict(committed_with(section, "amp", value)), section).amp == value


@pytest.mark.parametrize("value", ["yes", 1, "bf16", None])
@pytest.mark.parametrize("section", ["train", "evaluate"])
def test_a_bad_amp_names_the_key_and_the_choices(section, value):
    with pytest.raises(ParamsError, match=rf"{section}\.amp = .* is not allowed; use true / false or 'auto'"):
        params_from_dict(committed_with(section, "amp", value))


@pytest.mark.parametrize("value", ["auto", "shifted_gemm", "conv2d"])
def test_conv_kernel_choices(value):
    assert params_from_dict(committed_with("model", "conv_kernel", value)).model.conv_kernel == value


def test_a_bad_conv_kernel_names_the_key():
    with pytest.raises(ParamsError, match=r"model\.conv_kernel = 'winograd' is not allowed"):
        params_from_dict(committed_with("model", "conv_kernel", "winograd"))


def test_the_default_setup_pins_the_committed_runs_kernel_and_float32():
    """Reproducibility: the committed run's numbers must not move with the machine's timings."""
    params = load_params(ROOT / "params.yaml")
    assert params.model.conv_kernel == "shifted_gemm"
    assert params.train.amp is False and params.evaluate.amp is False
