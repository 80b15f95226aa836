"""benchmarks/summarize_seeds.py: the seed-noise table quoted in the README is computed right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_seeds.py"


def _row(variant, fold, seed, v1, vmm, schedule=None):
    extra = {"train.lr_schedule": schedule} if schedule else {}
    return {"variant": variant, "fold": fold, "set": {"train.seed": seed, **extra}, "id": f"r{seed}",
            "v1": v1, "vmm": vmm, "v5": v1 + 1.0, "vid": v1 + 2.0, "m1": 50.0, "m5": 60.0}


def _run(tmp_path: Path, rows: list[dict]) -> subprocess.CompletedProcess:
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True)


def test_means_stds_and_bar_counts_over_seeds(tmp_path):
    rows = [_row("dpr", 0, 0, 40.0, 20.0), _row("dpr", 0, 1, 44.0, 38.0), _row("dpr", 0, 2, 54.0, 20.0)]
    done = _run(tmp_path, rows)
    assert done.returncode == 0, done.stderr
    # 1-shot 40, 44, 54: mean 46.0, std 7.2; gains 20, 6, 34: mean 20.0, std 14.0, min +6.0
    assert "| dpr | 0 | 3 | 46.0 ± 7.2 | 20.0 ± 14.0 | +6.0 | 1.0 ± 0.0 | 2.0 ± 0.0 | 50.0 |" in done.stdout
    # two of three trainings reach the 10-point gain, one (54 >= 50) the matcher
    assert "| dpr | 46.0 | 20.0 | 2 / 3 | 1 / 3 | 50.0 |" in done.stdout


def test_settings_are_summarized_apart_and_side_by_side(tmp_path):
    rows = [_row("canet", 1, s, 30.0 + s, 29.0) for s in (0, 1)]
    rows += [_row("canet", 1, s, 40.0 + 2 * s, 20.0, schedule="poly") for s in (0, 1)]
    done = _run(tmp_path, rows)
    assert done.returncode == 0, done.stderr
    assert "### defaults" in done.stdout and "### train.lr_schedule=poly" in done.stdout
    # side by side: mean 1-shot / mean gain / mean over folds of the seed std
    assert "| canet | 30.5 / 1.5 / 0.7 | 41.0 / 21.0 / 1.4 |" in done.stdout


def test_a_failed_run_is_an_error_that_names_it(tmp_path):
    rows = [_row("fbaf", 2, 0, 40.0, 20.0), {"variant": "fbaf", "fold": 2, "set": {}, "id": "r007",
                                             "error": "RuntimeError: out of memory"}]
    done = _run(tmp_path, rows)
    assert done.returncode != 0
    assert "r007" in done.stderr and "out of memory" in done.stderr
