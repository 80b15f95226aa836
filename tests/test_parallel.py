"""simprop.infra.parallel: a stage's folds side by side in spawned worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from simprop.errors import DataError, FoldFailed, ParamsError
from simprop.infra.parallel import run_folds, threads_per_worker
from simprop.infra.stage import stage_jobs
from simprop.params import load_params


def where(tag: str) -> tuple[str, int, int]:
    import torch

    return tag, os.getpid(), torch.get_num_threads()


def fails_for(tag: str, bad: str, kind: str) -> str:
    if tag == bad:
        raise (DataError if kind == "expected" else ZeroDivisionError)(f"{tag} broke on purpose")
    return tag


def test_two_workers_run_every_job_in_spawned_processes_in_job_order():
    results = run_folds(where, [("a",), ("b",), ("c",)], workers=2, labels=["a", "b", "c"])
    assert [r[0] for r in results] == ["a", "b", "c"]
    pids = {r[1] for r in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {r[2] for r in results} == {threads_per_worker(2)}


def test_one_worker_or_one_job_runs_in_this_process_and_errors_propagate_unchanged():
    assert run_folds(where, [("a",), ("b",)], workers=1, labels=["a", "b"])[0][1] == os.getpid()
    assert run_folds(where, [("a",)], workers=4, labels=["a"])[0][1] == os.getpid()
    with pytest.raises(DataError, match="b broke"):
        run_folds(fails_for, [("a", "b", "expected"), ("b", "b", "expected")], workers=1, labels=["a", "b"])


def test_an_expected_error_in_a_worker_names_the_fold_and_fails_the_stage_cleanly():
    jobs = [("fold 0", "fold 1", "expected"), ("fold 1", "fold 1", "expected"), ("fold 2", "fold 1", "expected")]
    with pytest.raises(FoldFailed, match=r"^simpropnet fold 1: fold 1 broke on purpose$"):
        run_folds(fails_for, jobs, workers=2, labels=["simpropnet fold 0", "simpropnet fold 1", "simpropnet fold 2"])


def test_an_unexpected_error_in_a_worker_carries_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)fold 0 failed in its worker process.*ZeroDivisionError: a broke"):
        run_folds(fails_for, [("a", "a", "unexpected"), ("b", "a", "unexpected")], workers=2, labels=["fold 0", "fold 1"])


def test_sigterm_to_the_stage_process_stops_its_workers(tmp_path):
    """DVC (or a user) terminating a stage must not leave trainings running in orphaned workers."""
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from simprop.infra.parallel import run_folds
        from sleeper import sleep_and_record
        run_folds(sleep_and_record, [({str(pids)!r},), ({str(pids)!r},)], workers=2, labels=["fold 0", "fold 1"])
    """)
    (tmp_path / "sleeper.py").write_text(textwrap.dedent("""
        import os, time
        def sleep_and_record(path):
            with open(path, "a") as fh:
                fh.write(f"{os.getpid()}\\n")
            time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.2)
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "StageTerminated" in err
    time.sleep(0.5)
    for pid in workers:
        alive = os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower()
        assert not alive, f"worker {pid} still runs"


def test_a_failing_fold_stops_workers_whose_jobs_turn_sigterm_into_an_exception(tmp_path):
    """Each fold runs inside an MLflow stage run, which turns SIGTERM into StageTerminated so the
    run closes KILLED.  When one fold fails, the pool terminates the others; their workers must
    die, not report the exception as a result and wait on the task queue (the stage used to hang
    forever in Pool.terminate)."""
    pids = tmp_path / "pids"
    (tmp_path / "stagelike.py").write_text(textwrap.dedent("""
        import os, time
        from simprop.data.errors import DataError
        from simprop.infra.tracking.signals import terminate_as_exception
        def fold(name, path):
            if name == "fold 0":
                time.sleep(1.0)  # the other worker is inside its run by now
                raise DataError("fold 0 broke on purpose")
            with open(path, "a") as fh:
                fh.write(f"{os.getpid()}\\n")
            with terminate_as_exception():  # what simprop.infra.tracking.stage_run does
                time.sleep(120)
    """))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from simprop.infra.parallel import FoldFailed, run_folds
        from stagelike import fold
        jobs = [("fold 0", {str(pids)!r}), ("fold 1", {str(pids)!r}), ("fold 2", {str(pids)!r})]
        try:
            run_folds(fold, jobs, workers=2, labels=["fold 0", "fold 1", "fold 2"])
        except FoldFailed as exc:
            print("FoldFailed:", exc)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in (int(p) for p in pids.read_text().split()) if pids.exists() else ():
            os.kill(pid, signal.SIGKILL)
        pytest.fail("run_folds hung in Pool.terminate after a fold failed")
    assert "FoldFailed: fold 0: fold 0 broke on purpose" in out, err
    for pid in (int(p) for p in pids.read_text().split()):
        alive = os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower()
        assert not alive, f"worker {pid} still runs"


def test_parallel_folds_params_are_validated(tmp_path):
    from pathlib import Path

    import yaml

    base = yaml.safe_load(Path("params.yaml").read_text())
    for section, changes, message in (
        ("train", {"parallel_folds": 0}, "train.parallel_folds: must be >= 1"),
        ("evaluate", {"parallel_folds": 0}, "evaluate.parallel_folds"),
    ):
        params = yaml.safe_load(yaml.safe_dump(base))
        params[section].update(changes)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        with pytest.raises(ParamsError, match=message):
            load_params(path)


def test_stage_jobs_are_the_params_lists_or_the_one_asked_for():
    params = load_params("params.yaml")
    seeds = list(params.train.seeds)
    assert stage_jobs(params, None, None) == (list(params.train.variants), list(params.train.folds), seeds)
    assert stage_jobs(params, "canet", None) == (["canet"], list(params.train.folds), seeds)
    assert stage_jobs(params, None, 2) == (list(params.train.variants), [2], seeds)
    assert stage_jobs(params, "canet", 2, 1) == (["canet"], [2], [1])
    with pytest.raises(ParamsError, match=r"train.seeds: training seed 9 is not in \[0, 1, 2\]"):
        stage_jobs(params, "canet", 2, 9)
    with pytest.raises(ParamsError, match="nosuch"):
        stage_jobs(params, "nosuch", None)
    with pytest.raises(ParamsError, match=r"\(canet, fold 7\)"):
        stage_jobs(params, "canet", 7)
    with pytest.raises(ParamsError, match=r": fold 7 is not"):
        stage_jobs(params, None, 7)
