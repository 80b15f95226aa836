"""The real `dvc repro` of the data stages in a temporary git repository.

The project's dvc.yaml (its data stages), stage scripts, data library and DVC config are
copied into a fresh repo with a tiny generated tree; `dvc repro episodes` must succeed and
leave `dvc status --json` at `{}`. No part of DVC is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

DATA_STAGES = ("download", "augment", "splits", "episodes")


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def data_repo(tmp_path, tiny_synthetic) -> tuple[Path, dict[str, str]]:
    """A git + DVC repo holding the data stages, with a tiny generated tree in params.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    pipeline = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in DATA_STAGES}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["synthetic"].update(tiny_synthetic)
    params["data"]["workers"] = 2
    params["episodes"].update(num_episodes=20, num_val_episodes=10)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "stages").mkdir()
    for name in DATA_STAGES:
        shutil.copy(REPO_ROOT / "stages" / f"{name}.py", repo / "stages")
    (repo / "simprop").mkdir()
    for name in ("__init__.py", "params.py", "voc.py", "errors.py"):
        shutil.copy(REPO_ROOT / "simprop" / name, repo / "simprop")
    for layer in ("data", "infra"):  # the data stages need the data and infra layers only (tests/test_layers.py)
        shutil.copytree(REPO_ROOT / "simprop" / layer, repo / "simprop" / layer, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".gitignore").write_text("/data/\n__pycache__/\n")
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"]):
        assert run(cmd, repo, env).returncode == 0
    shutil.copy(REPO_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(REPO_ROOT / ".dvcignore", repo / ".dvcignore")
    assert run(["git", "add", "-A"], repo, env).returncode == 0
    assert run(["git", "commit", "-qm", "data stages"], repo, env).returncode == 0
    return repo, env


@pytest.mark.slow
def test_dvc_repro_of_the_data_stages_leaves_status_clean(data_repo, tiny_synthetic):
    repo, env = data_repo
    dvc = [sys.executable, "-m", "dvc"]
    repro = run([*dvc, "repro", "episodes"], repo, env)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    status = run([*dvc, "status", "--json"], repo, env)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    assert (repo / "data" / "episodes" / "fold3" / "test_seed3.csv").is_file()
    metrics = json.loads((repo / "metrics" / "splits.json").read_text())
    assert metrics["test_pool_images"] == tiny_synthetic["num_voc_images"] // 2

    # the params a stage reads are declared: a filter change dirties splits (and, through it, episodes)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["splits"]["small_object_filter"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(run([*dvc, "status", "--json"], repo, env).stdout)
    assert set(changed) == {"splits"}


@pytest.mark.slow
def test_an_in_place_edit_of_a_tracked_file_never_reaches_the_dvc_cache(data_repo):
    """Issue 28: with hard links (cache.type "reflink,hardlink,..."), ``truncate`` as root on a
    checked-out JPEG corrupted the cache object (root ignores the read-only bit), and ``dvc status``
    then said the data was up to date.  With the project's cache.type (reflink or copy) the
    workspace file is never the cache file: the cache stays intact and the edit is reported."""
    import hashlib

    repo, env = data_repo
    dvc = [sys.executable, "-m", "dvc"]
    repro = run([*dvc, "repro", "download"], repo, env)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    # what a fresh clone's `dvc pull` / `dvc checkout` does: workspace files linked from the cache
    relink = run([*dvc, "checkout", "--relink", "download"], repo, env)
    assert relink.returncode == 0, relink.stdout + relink.stderr
    jpeg = sorted((repo / "data" / "raw").rglob("*.jpg"))[0]
    digest = hashlib.md5(jpeg.read_bytes()).hexdigest()
    cached = repo / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    assert cached.is_file() and jpeg.stat().st_nlink == 1 and not jpeg.is_symlink()
    assert not os.path.samefile(jpeg, cached)
    with open(jpeg, "r+b") as fh:  # what `truncate -s 600` does, through the file's own inode
        fh.truncate(600)
    assert hashlib.md5(cached.read_bytes()).hexdigest() == digest  # the cache object is intact
    status = json.loads(run([*dvc, "status", "--json"], repo, env).stdout)
    assert "download" in status, status  # the edit is reported, not "up to date"
    restored = run([*dvc, "checkout", "--force", "download"], repo, env)
    assert restored.returncode == 0 and hashlib.md5(jpeg.read_bytes()).hexdigest() == digest
