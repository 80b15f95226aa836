"""``executor.kind: slurm`` on a real one-node SLURM cluster (tests/slurm_cluster.py: munged, slurmctld,
slurmd from Debian's packages on 127.0.0.1) through the real ``dvc repro`` / stage scripts in a temporary
git + DVC repository (tests/test_pipeline.py's helpers).

The tiny pipeline is 2 variants x 1 fold x 1 training seed, one thread per job, so that the local and the
SLURM runs are comparable number for number.  The module takes ~2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import default_sigint
from slurm_cluster import finished_jobs, job_record, missing_binaries, queued_jobs, start_cluster, stop_cluster
from test_pipeline import DVC, git_env, make_repo, run, tiny_params

pytestmark = pytest.mark.slow

VARIANTS = ["canet", "simpropnet"]
TIMING_KEYS = {"wall_time_s"}  # how long a job took: the one thing allowed to differ between executors


def params(kind: str) -> dict:
    p = tiny_params()
    p["splits"]["folds"] = [0]
    p["train"].update(variants=VARIANTS, folds=[0], seeds=[0], parallel_folds=1)
    p["evaluate"]["parallel_folds"] = 1
    p["executor"]["kind"] = kind
    p["executor"]["slurm"].update(cpus_per_job=1, poll_s=1.0, time_min=30)
    return p


def write_params(repo: Path, kind: str, name: str = "params.yaml", **train) -> None:
    p = params(kind)
    p["train"].update(train)
    (repo / name).write_text(yaml.safe_dump(p, sort_keys=False))


def metrics(repo: Path) -> dict[str, dict]:
    """Every train / evaluate metrics file, without the timing keys."""
    out = {}
    for stage in ("train", "evaluate"):
        for path in sorted((repo / "metrics" / stage).rglob("*.json")):
            record = json.loads(path.read_text())
            out[str(path.relative_to(repo))] = {k: v for k, v in record.items() if k not in TIMING_KEYS}
    return out


def slurm_runs(repo: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string="tags.executor = 'slurm'", max_results=100)


def completed_jobs(cluster, repo: Path, count: int, timeout: float = 30.0) -> dict[str, tuple[str, str]]:
    """``{"<array>_<task>": (job name, state)}`` of the stage jobs run from ``repo``, as slurmctld's
    jobcomp file records them (it writes a record as the job leaves the queue: wait for ``count``)."""
    deadline = time.monotonic() + timeout
    while True:
        done = {}
        for record in finished_jobs(cluster):
            if record.get("Name") in ("simprop-train", "simprop-evaluate") and record.get("WorkDir") == str(repo):
                done[f"{record['ArrayJobId']}_{record['ArrayTaskId']}"] = (record["Name"], record["JobState"])
        if len(done) >= count or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"SLURM binaries not installed: {', '.join(missing)} (apt-get install slurmd slurmctld slurm-client munge)"
        )
    started = start_cluster()
    try:
        yield started
    finally:
        stop_cluster(started)
        shutil.rmtree(started.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, cluster) -> Path:
    """The tiny pipeline reproduced with the local executor, one thread per job (``OMP_NUM_THREADS=1``:
    the stage runs its one fold in its own process, with torch's default thread count)."""
    path = make_repo(tmp_path_factory.mktemp("slurm") / "repo")
    write_params(path, "local")
    run(["git", "commit", "-qam", "2 variants x 1 fold x 1 seed"], path)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        started = time.monotonic()
        run([*DVC, "repro", "evaluate"], path, timeout=1200)
        (path / "local.seconds").write_text(f"{time.monotonic() - started:.1f}")
    finally:
        del os.environ["OMP_NUM_THREADS"]
    return path


def test_dvc_repro_on_slurm_runs_every_job_as_a_slurm_job_and_matches_the_local_run(repo, cluster):
    local = metrics(repo)
    assert len(local) == 4, sorted(local)  # 2 variants x (train + evaluate)
    write_params(repo, "slurm")
    # the executor is no DVC param: switching it reruns nothing
    assert json.loads(run([*DVC, "status", "--json", "evaluate"], repo).stdout) == {}
    for out in ("models", "metrics/train", "metrics/evaluate", "plots/train", "outputs/evaluate"):
        shutil.rmtree(repo / out)
    started = time.monotonic()
    result = run([*DVC, "repro", "evaluate"], repo, timeout=1200)
    print(
        f"local dvc repro evaluate (whole DAG): {(repo / 'local.seconds').read_text()} s; "
        f"train + evaluate on SLURM: {time.monotonic() - started:.1f} s"
    )
    assert "train: submitted 2 SLURM jobs" in result.stdout and "evaluate: submitted 2 SLURM jobs" in result.stdout

    # every train / evaluate job ran as a SLURM array task and completed (jobcomp/filetxt records)
    done = completed_jobs(cluster, repo, 4)
    assert sorted(name for name, _ in done.values()) == ["simprop-evaluate"] * 2 + ["simprop-train"] * 2, done
    assert {state for _, state in done.values()} == {"COMPLETED"}, done
    for job_id, (name, _) in done.items():
        assert (repo / "logs" / "slurm" / name.split("-")[1] / f"{job_id}_0_log.out").is_file()

    # each job's MLflow run says where it ran
    runs = slurm_runs(repo)
    assert sorted((r.data.tags["stage"], r.data.tags["variant"]) for r in runs) == sorted(
        (stage, v) for stage in ("train", "evaluate") for v in VARIANTS
    )
    assert {r.data.tags["slurm_job_id"] for r in runs} == set(done)
    assert all(r.data.tags["host"] and r.info.status == "FINISHED" for r in runs)

    # same numbers as the local executor, same files, and DVC has nothing left to do
    assert metrics(repo) == local
    assert json.loads(run([*DVC, "status", "--json", "evaluate"], repo).stdout) == {}
    assert "logs/" not in run(["git", "status", "--porcelain"], repo).stdout  # git-ignored


def test_a_failing_job_fails_the_stage_naming_the_job_and_its_log(repo, cluster):
    write_params(repo, "slurm")
    checkpoint = repo / "models" / "simpropnet" / "fold0" / "seed0" / "best.pt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(b"not a checkpoint")
    try:
        result = run([sys.executable, "stages/evaluate.py"], repo, check=False, timeout=600)
    finally:
        checkpoint.write_bytes(good)
    assert result.returncode == 2, result.stderr
    assert "1 of 2 SLURM jobs of the evaluate stage failed" in result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("simpropnet fold 0 seed 0 (SLURM job "))
    job_id = line.split("(SLURM job ", 1)[1].split(")", 1)[0]
    assert str(checkpoint.relative_to(repo)) in line  # the job's own error, one line
    log = repo / "logs" / "slurm" / "evaluate" / f"{job_id}_0_log.err"
    assert f"stderr: {log}" in result.stderr and "Error" in log.read_text()
    deadline = time.monotonic() + 30
    while job_id not in (states := completed_jobs(cluster, repo, 0)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert states[job_id] == ("simprop-evaluate", "FAILED")


def test_sigint_to_the_stage_cancels_its_array_and_fails_the_stage(repo, cluster, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True, ignore=shutil.ignore_patterns("models", "logs"))
    write_params(copy, "slurm", "params-long.yaml", epochs=500, iterations_per_epoch=50)  # runs for minutes
    env = {**git_env(), "PYTHONPATH": str(copy)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "stages/train.py", "--params", "params-long.yaml"], cwd=copy, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((copy / "models").glob("*/fold0/seed0/last.pt")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        assert queued_jobs(cluster), "the array is not running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "cancelling SLURM array" in err and "interrupted (SIGINT)" in err
    assert queued_jobs(cluster) == []
    runs = [r for r in slurm_runs(copy) if r.data.params.get("train.epochs") == "500"]  # this stage's runs
    assert sorted(r.data.tags["variant"] for r in runs) == VARIANTS and {r.info.status for r in runs} == {"KILLED"}


def test_a_task_interrupted_the_submitit_way_is_requeued_and_resumes_from_last_pt(repo, cluster, tmp_path):
    """SIGUSR2 (what SLURM sends before the time limit, or at preemption with send_user_signal) makes
    submitit call SlurmJob.checkpoint and requeue the task; the requeued task resumes from last.pt and the
    stage succeeds."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True, ignore=shutil.ignore_patterns("models", "logs"))
    write_params(copy, "slurm", "params-resume.yaml", variants=["simpropnet"], epochs=40, iterations_per_epoch=10)
    env = {**git_env(), "PYTHONPATH": str(copy)}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "stages/train.py", "--params", "params-resume.yaml", "--variant",
                             "simpropnet"], cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        last = copy / "models" / "simpropnet" / "fold0" / "seed0" / "last.pt"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not last.exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        (job_id,) = queued_jobs(cluster)
        subprocess.run(["scancel", "--signal=USR2", job_id], env=cluster.env, check=True, timeout=30)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"train with one requeue: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, err
    record = json.loads((copy / "metrics" / "train" / "simpropnet" / "fold0" / "seed0.json").read_text())
    assert record["resumed_from_epoch"] is not None and record["epochs"] == 40
    job = job_record(cluster, job_id)  # SLURM's own record: the job was requeued once
    assert job["Restarts"] == "1", job
    # submitit appends the requeued attempt to the first one's log: both attempts and the checkpoint in between.
    # Not its "Requeued job" line: submitit writes it after `scontrol requeue` returns, when slurmctld may already
    # be tearing the step down, and slurmstepd can drop it (seen once in CI; the job was requeued all the same)
    log = (copy / "logs" / "slurm" / "train" / f"{job_id}_0_log.out").read_text()
    assert "Caught signal SIGUSR2" in log and "Calling checkpoint method" in log, log
    assert log.count("Starting with JobEnvironment") == 2, log
