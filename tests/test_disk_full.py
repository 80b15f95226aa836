"""A full disk anywhere the pipeline writes (issue 28): one line naming the path and the space,
nothing half-written, the previous good file intact, no empty folder left behind.

Each test mounts a small tmpfs of its own (root only, as in CI; skipped with the reason where the
kernel refuses the mount) and fills it, so the writes meet a real ENOSPC, or torch's zip writer's
"unexpected pos" error, from the kernel.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow_server import mlflow_db_template  # noqa: F401  (fixture)

from simprop.errors import DiskFullError, StageError


@contextlib.contextmanager
def full_tmpfs(where: Path, size_kb: int = 256, leave_kb: int = 8):
    """A ``size_kb`` tmpfs at ``where``, filled until ``leave_kb`` are free; unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        filler = where / "filler"
        with open(filler, "wb") as fh:
            with contextlib.suppress(OSError):
                fh.write(b"\0" * ((size_kb - leave_kb) * 1024))
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_json_write_into_a_full_disk_is_one_error_and_keeps_the_old_file(tmp_path):
    from simprop.infra.atomic import write_json

    with full_tmpfs(tmp_path / "disk") as disk:
        target = disk / "metrics.json"
        write_json(target, {"ok": 1})  # fits
        with pytest.raises(DiskFullError) as info:
            write_json(target, {"big": "x" * 200_000})
        message = str(info.value)
        assert isinstance(info.value, StageError) and "\n" not in message
        assert str(target) in message and "no space left" in message and "MB free" in message
        assert "the previous metrics.json is intact" in message
        assert target.read_text() == '{\n  "ok": 1\n}\n'
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "metrics.json"]  # no temporary left


def test_a_checkpoint_into_a_full_disk_is_one_error_not_torchs_traceback(tmp_path):
    """Measured before: ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos``."""
    from simprop.model.checkpoint import _atomic_save

    with full_tmpfs(tmp_path / "disk") as disk:
        target = disk / "models" / "best.pt"
        with pytest.raises(DiskFullError, match=r"best\.pt: no space left .* needs at least .*nothing was left half-written"):
            _atomic_save({"weights": torch.zeros(100_000)}, target)
        assert list(target.parent.iterdir()) == []


def test_a_tree_into_a_full_disk_names_the_tree(tmp_path):
    from simprop.data.io import install_tree, write_pairs

    with full_tmpfs(tmp_path / "disk") as disk:
        target = disk / "splits"

        def build(tmp: Path) -> None:
            write_pairs(tmp / "fold0" / "train.csv", [(f"image_{i:06d}", 1) for i in range(20_000)])

        with pytest.raises(DiskFullError, match=rf"^{target}: no space left"):
            install_tree(target, build)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_an_mlflow_artifact_into_a_full_disk_is_one_error_and_fails_the_run(tmp_path, mlflow_db_template, monkeypatch):
    import dataclasses

    from mlflow_server import copy_store

    from simprop.infra.tracking import stage_run
    from simprop.params import Params, TrackingParams

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = copy_store(mlflow_db_template, tmp_path / "store")
    params = dataclasses.replace(Params(), tracking=TrackingParams(experiment="full", tracking_uri=uri))
    artifact = tmp_path / "best.pt"
    artifact.write_bytes(b"\1" * 200_000)
    with full_tmpfs(tmp_path / "repo", size_kb=256, leave_kb=16) as repo:
        with pytest.raises(DiskFullError, match=r"MLflow store of run \w+ .* has no space left"):
            with stage_run("train", params, variant="dpr", fold=0, repo_root=repo) as run:
                run.log_artifact(artifact, "checkpoint")
    import mlflow

    found = mlflow.MlflowClient(tracking_uri=uri).search_runs([run.experiment_id])
    assert [r.info.status for r in found] == ["FAILED"]
