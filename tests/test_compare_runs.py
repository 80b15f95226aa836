"""benchmarks/compare_runs.py: committed runs side by side, read from git history in both layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_runs.py"
VARIANTS = ("canet", "dpr", "fbaf", "dpr_fbaf", "simpropnet")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _new_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    return repo


def _commit_run(repo: Path, one_shot: dict, gain: dict, old_layout: bool) -> str:
    """Writes a metrics/evaluate tree (1-shot mean and support gain per (variant, fold)) and commits it."""
    for variant in VARIANTS:
        for fold in range(4):
            rel = f"{variant}_fold{fold}.json" if old_layout else f"{variant}/fold{fold}.json"
            path = repo / "metrics" / "evaluate" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"shot1": {"miou_mean": one_shot.get((variant, fold), 50.0)},
                      "support_use": {"support_gain": gain.get((variant, fold), 20.0)}}
            path.write_text(json.dumps(record))
    if not old_layout:  # the newer layout replaces the older one, as in the project's history
        for old in (repo / "metrics" / "evaluate").glob("*_fold*.json"):
            old.unlink()
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "run")
    return _git(repo, "rev-parse", "--short", "HEAD")


def test_runs_side_by_side_across_both_layouts(tmp_path):
    repo = _new_repo(tmp_path)
    first = _commit_run(repo, {("simpropnet", 0): 60.0}, {("simpropnet", 0): 30.0}, old_layout=True)
    second = _commit_run(repo, {("simpropnet", 0): 40.0}, {("simpropnet", 0): 5.0, ("canet", 3): 9.99}, old_layout=False)
    done = subprocess.run([sys.executable, str(SCRIPT), first, second, "--repo", str(repo)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # simpropnet: folds 1-3 at 50, fold 0 at 60 then 40 -> means 52.50 and 47.50, their mean 50.00, range 5.00;
    # gains: 4 of 4 folds >= 10 in the first run, 3 of 4 in the second
    assert "| simpropnet | 52.50 | 47.50 | 50.00 | 5.00 | 4 / 4 | 3 / 4 |" in done.stdout
    assert "| canet | 50.00 | 50.00 | 50.00 | 0.00 | 4 / 4 | 3 / 4 |" in done.stdout  # 9.99 is under the bar
    assert "| simpropnet | 0 | 60.00 / 40.00 | 20.00 | +30.00 / +5.00 | +5.00 |" in done.stdout


def test_a_run_without_a_record_is_an_error_that_names_it(tmp_path):
    repo = _new_repo(tmp_path)
    (repo / "README").write_text("no metrics here\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "empty")
    done = subprocess.run([sys.executable, str(SCRIPT), "HEAD", "--repo", str(repo)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "HEAD: no metrics/evaluate record for canet fold 0" in done.stderr
