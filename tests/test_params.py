"""params.yaml validation: bad values fail before any work, naming the key."""

from pathlib import Path

import pytest
import yaml

from simprop.params import ParamsError, load_params, params_from_dict

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
