"""benchmarks/dead_channels.py counts a projection channel as dead exactly when it is zero everywhere."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from simprop.model import build_model
from simprop.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("dead_channels", ROOT / "benchmarks" / "dead_channels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_channel_pushed_below_zero_everywhere_is_dead_and_the_others_are_alive():
    params = load_params(ROOT / "params.yaml")
    model = build_model("canet", dataclasses.replace(params.model, backbone_weights="none", channels=8), init_seed=0)
    conv = model.projection[0]
    features = torch.rand(3, 1536, 9, 9)  # non-negative, like the backbone's ReLU outputs
    alive_channels = _script().alive_channels
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))
    assert alive_channels(model, features) == (6, 8)
    with torch.no_grad():  # alive on one pixel of one image is alive
        conv.weight[1, 0, 1, 1] = 1.0  # middle tap, input channel 0
        features[:, 0] = 0.0
        features[2, 0, 4, 4] = 5.0
    assert alive_channels(model, features) == (7, 8)
    assert model.training  # the probe leaves the mode as it was
