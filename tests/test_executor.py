"""simprop.infra.executor: which GPUs the local workers get, and the ``executor`` params.

No GPU is needed: the assignment is checked in real spawned workers through the ``CUDA_VISIBLE_DEVICES``
each one had when its jobs ran (the value CUDA would read when torch first touches the GPU)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from simprop.errors import ParamsError
from simprop.infra.executor import gpu_slots, visible_gpus
from simprop.infra.parallel import run_folds, threads_per_worker
from simprop.params import params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def pinned_job(tag: str) -> tuple[str, int, str, float, float, int, bool]:
    import torch

    start = time.time()
    time.sleep(0.3)  # long enough for jobs on different workers to overlap
    return (tag, os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", ""), start, time.time(),
            torch.get_num_threads(), torch.cuda.is_initialized())  # fmt: skip


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,2"}) == ["0", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 3 , 1 "}) == ["3", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]  # CUDA stops at the first invalid id
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8e1c,GPU-77aa"}) == ["GPU-8e1c", "GPU-77aa"]


def test_only_a_cuda_capable_stage_device_gets_one_worker_per_gpu():
    assert gpu_slots("auto", ["0", "1"]) == ["0", "1"]
    assert gpu_slots("cuda", ["4"]) == ["4"]
    assert gpu_slots("cpu", ["0", "1"]) == []  # the CPU path, exactly as before
    assert gpu_slots("cuda:1", ["0", "1"]) == []  # the user picked the GPU: no pinning
    assert gpu_slots("auto", []) == []


def test_each_worker_is_pinned_to_its_own_gpu_and_runs_one_job_at_a_time():
    """Five jobs on two "GPUs": two workers, each with one CUDA_VISIBLE_DEVICES for its whole life, the two
    different, never more than two jobs at once, and torch threads = cores // 2 as for CPU workers."""
    jobs = [(f"fold {i}",) for i in range(5)]
    results = run_folds(pinned_job, jobs, workers=1, labels=[j[0] for j in jobs], devices=["3", "5"])
    assert [r[0] for r in results] == [j[0] for j in jobs]
    by_worker: dict[int, set[str]] = {}
    for _, pid, device, *_ in results:
        by_worker.setdefault(pid, set()).add(device)
    assert os.getpid() not in by_worker and len(by_worker) == 2
    assert sorted(d for devices in by_worker.values() for d in devices) == ["3", "5"]  # one GPU each, distinct
    events = sorted([(r[3], 1) for r in results] + [(r[4], -1) for r in results], key=lambda e: (e[0], e[1]))
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most <= 2
    assert {r[5] for r in results} == {threads_per_worker(2)}
    assert not any(r[6] for r in results)  # nothing initialised CUDA before the job did


def test_one_gpu_or_one_job_runs_in_the_stage_process_as_before():
    (result,) = run_folds(pinned_job, [("fold 0",)], workers=2, labels=["fold 0"], devices=["0", "1"])
    assert result[1] == os.getpid()
    results = run_folds(pinned_job, [("fold 0",), ("fold 1",)], workers=2, labels=["fold 0", "fold 1"], devices=["0"])
    assert {r[1] for r in results} == {os.getpid()}


def committed() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (lambda e: e.__setitem__("kind", "pbs"), "executor.kind"),
        (lambda e: e["slurm"].__setitem__("cpus_per_job", 0), "executor.slurm.cpus_per_job"),
        (lambda e: e["slurm"].__setitem__("array_parallelism", -1), "executor.slurm.array_parallelism"),
        (lambda e: e["slurm"].__setitem__("gpus_per_job", -1), "executor.slurm.gpus_per_job"),
        (lambda e: e["slurm"].__setitem__("additional", {"--mail-type": "FAIL"}), "executor.slurm.additional"),
        (lambda e: e["slurm"].__setitem__("additional", ["exclusive"]), "executor.slurm.additional"),
        (lambda e: e["slurm"].__setitem__("setup", "module load cuda"), "executor.slurm.setup"),
        (lambda e: e["slurm"].pop("partition"), "executor.slurm.partition"),
    ],
)
def test_bad_executor_params_name_the_key(edit, phrase):
    raw = committed()
    edit(raw["executor"])
    with pytest.raises(ParamsError, match=phrase.replace(".", r"\.")):
        params_from_dict(raw)


def test_slurm_settings_are_read_and_ddp_training_is_refused_on_slurm():
    raw = committed()
    raw["executor"]["kind"] = "slurm"
    raw["executor"]["slurm"].update(partition="gpu", gpus_per_job=1, setup=["module load cuda"],
                                    additional={"constraint": "a100", "exclusive": True})  # fmt: skip
    settings = params_from_dict(raw).executor.slurm
    assert settings.partition == "gpu" and settings.setup == ("module load cuda",)
    assert settings.additional == {"constraint": "a100", "exclusive": True}
    raw["train"]["processes"] = 2
    with pytest.raises(ParamsError, match=r"executor\.kind: slurm .*train\.processes = 2"):
        params_from_dict(raw)


def test_no_stage_of_dvc_yaml_depends_on_the_executor_params():
    """Where a job runs must not change or invalidate any output: ``executor`` is no DVC param."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            keys = entry if isinstance(entry, str) else next(iter(entry.values()), [])
            for key in [keys] if isinstance(keys, str) else keys:
                assert not str(key).startswith("executor"), f"dvc.yaml stage {name} lists {key}"
