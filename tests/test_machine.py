"""What a run records it ran on (issue 29): the machine block, ``amp: auto``, and both in the train
and evaluate stages' metrics files and MLflow runs."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow_server import copy_store, mlflow_db_template  # noqa: F401  (fixture)

from simprop.infra import device as device_module
from simprop.infra import machine
from simprop.infra.device import autocast, cpu_has_native_bf16, needs_grad_scaler, precision, resolve_amp

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

CPU = torch.device("cpu")
AVX512_BF16 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
AMX = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f amx_tile amx_bf16\n"
AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma\n"


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, model, bf16, native", [
    (AVX512_BF16, "AMD EPYC 9R14 96-Core Processor", "yes (avx512_bf16)", True),
    (AMX, "Intel(R) Xeon(R) Platinum 8480+", "yes (amx_bf16)", True),
    (AVX2, "AMD EPYC 7B13", "no", False),
])  # fmt: skip
def test_cpu_model_and_native_bf16_come_from_cpuinfo(tmp_path, text, model, bf16, native):
    info = machine.machine_info(_cpuinfo(tmp_path, text))
    assert info["cpu_model"] == model and info["cpu_native_bf16"] == bf16
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, text)) is native


def test_without_cpuinfo_the_machine_block_still_says_what_it_can(tmp_path):
    info = machine.machine_info(tmp_path / "absent")
    assert info["cpu_native_bf16"] == "unknown"
    assert info["cpu_model"] == (platform.processor() or platform.machine() or "unknown")


def test_the_machine_block_names_the_libraries_and_torch_facts():
    info = machine.machine_info()
    assert set(info) == {"cpu_model", "cpu_native_bf16", "torch_cpu_capability", "torch_threads", "gpu", "python",
                         "torch", "torchvision", "numpy", "mlflow", "dvc"}  # fmt: skip
    assert all(isinstance(value, str) and value for value in info.values())  # valid tags, and dvc metrics show lists them
    assert info["torch"] == torch.__version__ and info["python"] == platform.python_version()
    for name in ("numpy", "mlflow", "dvc", "torchvision"):
        assert info[name] == importlib.metadata.version(name)
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == str(torch.get_num_threads())
    assert info["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    assert machine.machine_tags(info) == {f"machine.{k}": v for k, v in info.items()}
    assert machine.library_version("no-such-distribution-simprop") == "not installed"


def test_tags_cost_no_torch_import_in_a_stage_that_does_not_use_torch():
    """download, splits, ... must not pay torch's import for a tag: the torch facts say so instead."""
    code = ("import json, sys; from simprop.infra.tracking.tags import stage_tags; from simprop.params import load_params; "
            "tags = stage_tags('splits', load_params('params.yaml')); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'tags': tags}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    got = json.loads(out.stdout)
    assert got["torch"] is False
    assert got["tags"]["machine.torch_threads"] == machine.NOT_LOADED
    assert got["tags"]["machine.cpu_model"] == machine.cpu_model()


# --------------------------------------------------------------------------- amp: auto


def test_amp_auto_is_bf16_exactly_where_the_cpu_has_it_natively(monkeypatch):
    assert resolve_amp("auto", CPU) is cpu_has_native_bf16()
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("auto", CPU) is True and precision(CPU, True) == "bf16"
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp("auto", CPU) is False and precision(CPU, False) == "fp32"
    assert resolve_amp(True, CPU) is True and resolve_amp(False, CPU) is False  # the values accepted before
    with pytest.raises(ValueError, match="'maybe'"):
        resolve_amp("maybe", CPU)


@pytest.mark.parametrize("bf16, expected", [(True, True), (False, False)])
def test_amp_auto_on_cuda_follows_native_bf16_and_never_picks_fp16(monkeypatch, bf16, expected):
    seen = {}

    def is_bf16_supported(including_emulation=True):
        seen["including_emulation"] = including_emulation
        return bf16

    monkeypatch.setattr(torch.cuda, "device", lambda _: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_amp("auto", torch.device("cuda:0")) is expected
    assert seen["including_emulation"] is False  # emulated bf16 is not native


def test_an_unresolved_auto_cannot_switch_autocast_on_by_being_truthy():
    for call in (lambda: autocast(CPU, "auto"), lambda: needs_grad_scaler(CPU, "auto")):
        with pytest.raises(TypeError, match="resolve_amp"):
            call()


# --------------------------------------------------------------------------- the records of a run


@pytest.mark.slow  # ~1.5-2 min on the 2-core CPU: a training and a full evaluation of the tiny tree
def test_train_and_evaluate_record_precision_kernel_and_machine(feature_cache_tree, monkeypatch, mlflow_db_template):
    """A tiny train + evaluate of one (variant, fold): both metrics files and MLflow runs say the
    precision amp resolved to, the encoder conv's forms and the machine."""
    import mlflow

    from simprop.evaluate.run import evaluate_fold
    from simprop.layout import RunLayout
    from simprop.model import shifted_gemm
    from simprop.train.fold import train_fold

    params, root, _ = feature_cache_tree(
        model={"channels": 8, "conv_kernel": "conv2d"},
        train={"image_size": 33, "batch_size": 4, "epochs": 1, "iterations_per_epoch": 2, "amp": "auto",
               "projection_lr_scale": 1.0, "projection_init": "default"},
    )  # fmt: skip
    evaluate = dataclasses.replace(params.evaluate, image_size=33, amp="auto", shots=(1,), identical_input=False)
    params = dataclasses.replace(params, evaluate=evaluate,
                                 episodes=dataclasses.replace(params.episodes, test_seeds=(1,)))  # fmt: skip
    monkeypatch.chdir(root)  # the tracking store and artifacts under this test's folder
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    uri = copy_store(mlflow_db_template, root)
    shifted_gemm.clear_kernel_choices()
    train_fold(params, "canet", 0, root)
    evaluate_fold(params, "canet", 0, root)

    expected_precision = "bf16" if cpu_has_native_bf16() else "fp32"
    layout = RunLayout(root, "canet", 0, params.train.seed)
    client = mlflow.MlflowClient(uri)
    runs = {r.info.run_name.split("/")[0]: r for r in client.search_runs(client.search_experiments()[0].experiment_id)}
    for stage, path in (("train", layout.train_metrics), ("evaluate", layout.evaluate_metrics)):
        record = json.loads(path.read_text())
        assert record["amp"] == "auto" and record["precision"] == expected_precision, stage
        assert record["machine"] == machine.machine_info(), stage
        kernel = record["conv_kernel"]
        assert kernel["setting"] == "conv2d" and kernel["used"] in ("conv2d", "none"), stage
        assert all(entry["kernel"] == "conv2d" for entry in kernel["problems"].values()), stage
        tags = runs[stage].data.tags
        assert tags["precision"] == expected_precision and tags["conv_kernel"] == "conv2d", stage
        assert tags["conv_kernel_used"] == kernel["used"], stage
        assert tags["machine.cpu_model"] == machine.cpu_model() and tags["machine.torch"] == torch.__version__, stage
