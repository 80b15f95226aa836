"""MLflow tracking against real stores: a sqlite file per test and a real ``mlflow server``."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from mlflow_server import copy_store, mlflow_db_template, mlflow_server  # noqa: E402,F401  (fixtures)
from processes import default_sigint  # noqa: E402

from simprop.infra.tracking import stage_run
from simprop.infra.tracking.store import find_repo_root, original_repo_root, resolve_tracking
from simprop.infra.tracking.tags import run_name, sanitize_key
from simprop.params import Params, TrackingParams  # noqa: E402


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _params(uri: str = "", experiment: str = "simprop-test") -> Params:
    return dataclasses.replace(Params(), tracking=TrackingParams(experiment=experiment, tracking_uri=uri))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, mlflow_db_template):
    """One repo root + sqlite store for the module (tests keep apart by experiment name)."""
    root = tmp_path_factory.mktemp("repo")
    copy_store(mlflow_db_template, root)
    return root


def _git_repo(path: Path) -> str:
    """Make ``path`` a git repo with one commit; return the commit."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    return git("rev-parse", "HEAD").strip()


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


# --------------------------------------------------------------------------- locations


def test_temp_experiment_copy_maps_to_original_root(tmp_path, clean_env):
    repo = tmp_path / "repo"
    # dvc exp run --temp (DVC 3.67) / --queue run stages in these copies
    standalone = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpawju_2ja"
    queued = repo / ".dvc" / "tmp" / "exps" / "tmppal8pkij"
    for d in (standalone / "sub", queued, repo / "stages"):
        d.mkdir(parents=True)
    (standalone / ".dvc").mkdir()  # the copy is a full repo of its own
    (repo / ".git").mkdir()
    assert original_repo_root(standalone / "sub") == repo
    assert original_repo_root(queued) == repo
    assert original_repo_root(repo / "stages") is None

    clean_env.chdir(standalone)
    assert find_repo_root() == repo
    uri, artifacts = resolve_tracking()
    assert uri == f"sqlite:///{repo / 'mlflow.db'}"
    assert artifacts == (repo / "mlartifacts").as_uri()
    clean_env.chdir(queued)
    assert find_repo_root() == repo
    clean_env.chdir(repo / "stages")
    assert find_repo_root() == repo  # nearest parent with .git
    clean_env.setenv("DVC_ROOT", str(repo))
    clean_env.chdir(tmp_path)
    assert find_repo_root() == repo
    assert find_repo_root(standalone) == repo  # an explicit root is mapped too


def test_tracking_uri_precedence(tmp_path, clean_env):
    root = tmp_path
    assert resolve_tracking(root)[0] == f"sqlite:///{root / 'mlflow.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # relative: anchored at root
    assert resolve_tracking(root)[0] == f"sqlite:///{root / 'elsewhere.db'}"
    assert resolve_tracking(root, tracking_uri="sqlite:////abs/x.db")[0] == "sqlite:////abs/x.db"
    uri, artifacts = resolve_tracking(root, tracking_uri="http://127.0.0.1:5000", experiment="e")
    assert (uri, artifacts) == ("http://127.0.0.1:5000", None)  # the server decides
    assert resolve_tracking(root, experiment="my exp")[1] == (root / "mlartifacts" / "my_exp").as_uri()


def test_names_are_sanitised():
    assert sanitize_key("miou@1shot(fold0)") == "miou_1shot_fold0"
    assert sanitize_key("/a/../b//c") == "a/b/c"
    assert sanitize_key("train.lr") == "train.lr"
    assert run_name("train", "simpropnet", 0) == "train/simpropnet/fold0"
    assert run_name("evaluate", "canet", 2, [1, 5]) == "evaluate/canet/fold2/1,5shot"
    assert run_name("report") == "report"


# --------------------------------------------------------------------------- sqlite store


def test_stage_run_records_tags_params_metrics_artifacts(tmp_path, store_root, clean_env):
    clean_env.setenv("DVC_EXP_NAME", "dowie-vega")
    clean_env.setenv("DVC_STAGE", "train@simpropnet")
    head = _git_repo(tmp_path)  # a repo of our own: the shared checkout's HEAD moves under us
    clean_env.chdir(tmp_path)
    params = _params()
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"\x00checkpoint")
    with stage_run("train", params, variant="simpropnet", fold=0, shots=1, repo_root=store_root) as run:
        run.log_metrics({"loss": 0.5}, step=1)
        run.log_metrics({"loss": 0.25}, step=2)
        run.log_history("loss_per_step", [0, 1, 2], [3.0, 2.0, 1.0])
        run.log_metrics({"val": {"miou@1shot": 41.5, "skipped": None}}, step=0)
        run.log_artifact(ckpt, artifact_path="checkpoints")
        run.log_dict({"miou": 41.5}, "metrics/train.json")
        run_id = run.run_id

    client = _client(f"sqlite:///{store_root / 'mlflow.db'}")
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "train/simpropnet/fold0/1shot"
    tags = got.data.tags
    for key, value in {
        "stage": "train", "variant": "simpropnet", "fold": "0", "shots": "1", "protocol": "oslsm",
        "seeds": "test=1,2,3;train=0", "episodes": "1000", "eval_resolution": "original",
        "setup": "default", "dvc_exp_name": "dowie-vega", "dvc_stage": "train@simpropnet",
    }.items():  # fmt: skip
        assert tags[key] == value, key
    assert tags["git_commit"] == head
    flat = params.flat()
    assert set(got.data.params) == set(flat)
    assert got.data.params["train.lr"] == "0.0025"
    assert got.data.params["episodes.test_seeds"] == "[1, 2, 3]"
    assert got.data.metrics["val.miou_1shot"] == 41.5
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert len(client.get_metric_history(run_id, "loss_per_step")) == 3

    # artifacts land under <repo root>/mlartifacts/<experiment>/<run id>/artifacts
    exp = client.get_experiment(got.info.experiment_id)
    assert exp.artifact_location == (store_root / "mlartifacts" / "simprop-test").as_uri()
    art = store_root / "mlartifacts" / "simprop-test" / run_id / "artifacts"
    assert (art / "checkpoints" / "best.pt").read_bytes() == b"\x00checkpoint"
    assert (art / "metrics" / "train.json").is_file()
    assert "train:" in (art / "params.yaml").read_text()


def test_failed_stage_marks_run_failed_and_reraises(store_root, clean_env):
    params = _params(experiment="failing")
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("evaluate", params, variant="canet", fold=3, repo_root=store_root) as run:
            run_id = run.run_id
            raise RuntimeError("boom")
    got = _client(f"sqlite:///{store_root / 'mlflow.db'}").get_run(run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["error"] == "RuntimeError: boom"
    assert got.data.tags["variant"] == "canet" and got.data.tags["fold"] == "3"


def test_env_uri_and_second_run_reuse_experiment(tmp_path, store_root, clean_env):
    store = store_root / "mlflow.db"  # given through the environment, repo root elsewhere
    clean_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    ids = []
    for stage in ("download", "report"):
        with stage_run(stage, _params(experiment="env-uri"), repo_root=tmp_path) as run:
            ids.append((run.experiment_id, run.run_id))
            assert run.tracking_uri == f"sqlite:///{store}"
    assert ids[0][0] == ids[1][0] and ids[0][1] != ids[1][1]
    assert _client(f"sqlite:///{store}").get_run(ids[1][1]).data.tags["variant"] == "all"
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_metric_value_is_named(store_root, clean_env):
    with pytest.raises(TypeError, match="'variant'"):
        with stage_run("report", _params(experiment="bad"), repo_root=store_root) as run:
            run.log_metrics({"variant": "canet"})


# --------------------------------------------------------------------------- real server


@pytest.mark.slow
def test_run_is_browsable_through_a_real_server(tmp_path, clean_env, mlflow_server):
    params = _params(uri=mlflow_server.url, experiment="served")
    table = tmp_path / "tables.md"
    table.write_text("| a | b |\n")
    with stage_run("evaluate", params, variant="simpropnet", fold=1, shots=[1, 5], repo_root=tmp_path) as run:
        for step, value in enumerate([0.9, 0.7, 0.4]):
            run.log_metrics({"loss": value}, step=step)
        run.log_metrics({"shot1.miou_mean": 55.5})
        run.log_artifact(table, artifact_path="reports")
        run_id = run.run_id
    assert not (tmp_path / "mlartifacts").exists()  # the server stores artifacts, not the client

    exp = mlflow_server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="served")
    exp_id = exp["experiment"]["experiment_id"]
    runs = mlflow_server.post(
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp_id], "filter": "tags.stage = 'evaluate' and tags.variant = 'simpropnet'"},
    )["runs"]
    assert [r["info"]["run_id"] for r in runs] == [run_id]
    found = runs[0]
    assert found["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in found["data"]["tags"]}
    assert tags["shots"] == "1,5" and tags["fold"] == "1" and tags["protocol"] == "oslsm"
    assert {p["key"] for p in found["data"]["params"]} >= {"train.lr", "tracking.experiment"}

    history = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="loss")
    assert [(m["step"], m["value"]) for m in history["metrics"]] == [(0, 0.9), (1, 0.7), (2, 0.4)]

    listed = mlflow_server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id)
    assert {f["path"] for f in listed["files"]} >= {"params.yaml", "reports"}
    listed = mlflow_server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="reports")
    assert [f["path"] for f in listed["files"]] == ["reports/tables.md"]
    stored = list((mlflow_server.root / "artifacts").rglob("tables.md"))
    assert len(stored) == 1 and stored[0].read_text() == "| a | b |\n"


# --------------------------------------------------------------------------- the experiment kind


def test_experiment_opens_on_the_runs_table(tmp_path, mlflow_db_template, clean_env):
    """MLflow 3's UI shows an experiment as model training (the runs table) when its
    ``mlflow.experimentKind`` tag says so; a new experiment gets it, an existing one lacking it too."""
    uri = copy_store(mlflow_db_template, tmp_path)
    client = _client(uri)
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())  # no kind tag
    for name in ("made-before", "made-now"):
        with stage_run("report", _params(uri=uri, experiment=name), repo_root=tmp_path):
            pass
        exp = client.get_experiment_by_name(name)
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development", name
    assert client.get_experiment_by_name("made-before").experiment_id == old


# --------------------------------------------------------------------------- stage processes

STAGE_SCRIPT = r'''
"""A stage process: run_stage + stage_run, as every stages/*.py script."""
import os, sys, time
from pathlib import Path

root, mode = Path(sys.argv[1]), sys.argv[2]
import signal
import mlflow  # noqa: F401  (imported before the start signal, so that all processes open the store at once)
from simprop.infra.stage import run_stage
from simprop.infra.tracking import stage_run


def body(params):
    while not (root / "go").exists():
        time.sleep(0.01)
    with stage_run("report", params, repo_root=root) as run:
        (root / f"run-{os.getpid()}.txt").write_text(run.run_id)
        if mode.startswith("signal-in-write:"):  # the signal arrives inside log_metrics' write
            sig, real = getattr(signal, mode.split(":")[1]), run.client.log_batch

            def log_batch(*args, **kwargs):
                run.client.log_batch = real
                os.kill(os.getpid(), sig)
                time.sleep(0.5)  # Python runs the handler here, in the middle of the write
                return real(*args, **kwargs)

            run.client.log_batch = log_batch
        run.log_metrics({"pid": os.getpid()})
        while mode == "wait":
            time.sleep(0.05)
    return 0


sys.exit(run_stage("report", body, root / "params.yaml"))
'''


def _stage_root(tmp_path: Path, template: Path | None = None) -> Path:
    """A repository root for stage processes; ``template``: start from a migrated store (fast)."""
    from simprop.params import dump_yaml

    root = tmp_path / "repo"
    root.mkdir()
    if template is not None:
        copy_store(template, root)
    (root / "params.yaml").write_text(dump_yaml(Params()))
    (root / "stage_script.py").write_text(STAGE_SCRIPT)
    return root


def _start_stage(root: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), MLFLOW_DISABLE_TELEMETRY="true")
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_ROOT"):
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, str(root / "stage_script.py"), str(root), mode], cwd=root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_sigint,
    )  # fmt: skip


def _wait_for_run(root: Path, proc: subprocess.Popen, timeout: float = 120.0) -> str:
    path = root / f"run-{proc.pid}.txt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise AssertionError(f"stage exited with {proc.returncode}:\n{proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the stage did not open its run in time")


@pytest.mark.slow
def test_four_stage_processes_on_a_fresh_store_all_land(tmp_path, clean_env):
    """Four stages starting at once on a store that does not exist yet (two queued experiments on
    a fresh clone): MLflow's schema creation and migration run once, under the store lock; every
    run lands and the store stays usable.  Without the lock, 4 of 4 processes died with
    sqlite/alembic errors and the store kept ``_alembic_tmp_*`` tables."""
    import sqlite3

    root = _stage_root(tmp_path)
    procs = [_start_stage(root, "finish") for _ in range(4)]
    time.sleep(3.0)  # all four have imported mlflow and wait for the start signal
    (root / "go").touch()
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code == 0, err[-3000:]
        assert "Traceback" not in err
    client = _client(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("simprop")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {int(r.data.metrics["pid"]) for r in runs} == {p.pid for p in procs}
    with sqlite3.connect(root / "mlflow.db") as db:
        tables = [name for (name,) in db.execute("select name from sqlite_master where type = 'table'")]
    assert not [t for t in tables if t.startswith("_alembic_tmp")]
    assert (root / "mlflow.db.lock").is_file()  # the lock lives beside the store


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_terminated_stage_marks_its_run_killed(tmp_path, clean_env, mlflow_db_template, sig, code):
    root = _stage_root(tmp_path, mlflow_db_template)
    (root / "go").touch()
    proc = _start_stage(root, "wait")
    run_id = _wait_for_run(root, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert f"report: {'interrupted (SIGINT)' if sig == signal.SIGINT else 'terminated by SIGTERM'}" in err
    assert "marked KILLED" in err
    got = _client(f"sqlite:///{root / 'mlflow.db'}").get_run(run_id)
    assert got.info.status == "KILLED" and got.info.end_time is not None


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_an_mlflow_write_waits_for_it(tmp_path, clean_env, mlflow_db_template, sig, code):
    """SIGTERM / Ctrl-C inside an MLflow write is held until the write returns, then ends the
    stage: the write lands whole and the run is closed KILLED.  Raised mid-write, it once left
    SQLite's write lock with the interrupted connection, and the KILLED mark failed with
    "database is locked" (the run stayed RUNNING)."""
    root = _stage_root(tmp_path, mlflow_db_template)
    (root / "go").touch()
    proc = _start_stage(root, f"signal-in-write:{sig.name}")
    assert proc.wait(timeout=120) == code
    err = proc.stderr.read()
    assert "Traceback" not in err and "database is locked" not in err, err[-3000:]
    assert "marked KILLED" in err
    got = _client(f"sqlite:///{root / 'mlflow.db'}").get_run((root / f"run-{proc.pid}.txt").read_text())
    assert got.info.status == "KILLED" and got.info.end_time is not None
    assert got.data.metrics["pid"] == proc.pid  # the write the signal came into was completed
    assert ("KeyboardInterrupt" if sig == signal.SIGINT else "StageTerminated") in got.data.tags["error"]


@pytest.mark.slow
def test_a_run_left_running_by_a_killed_stage_is_closed_by_the_next_run(tmp_path, clean_env, mlflow_db_template):
    """SIGKILL leaves the run RUNNING; when the same stage (same run name, DVC experiment and
    repository) starts again, that run is closed as KILLED and the two runs name each other.
    A RUNNING run whose process still lives (a parallel stage) is left alone."""
    root = _stage_root(tmp_path, mlflow_db_template)
    (root / "go").touch()
    killed = _start_stage(root, "wait")
    killed_id = _wait_for_run(root, killed)
    alive = _start_stage(root, "wait")
    alive_id = _wait_for_run(root, alive)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    client = _client(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(killed_id).info.status == "RUNNING"  # nobody closed it
    try:
        with stage_run("report", params_from_root(root), repo_root=root) as run:
            new_id = run.run_id
        old = client.get_run(killed_id)
        assert old.info.status == "KILLED" and old.info.end_time is not None
        assert old.data.tags["replaced_by_run"] == new_id
        assert "found RUNNING when the stage started again" in old.data.tags["killed_reason"]
        assert client.get_run(new_id).data.tags["replaces_run"] == killed_id
        assert client.get_run(alive_id).info.status == "RUNNING", "a live stage's run must not be closed"
    finally:
        alive.terminate()
        alive.wait(timeout=60)
    assert client.get_run(alive_id).info.status == "KILLED"


def params_from_root(root: Path) -> Params:
    from simprop.params import load_params

    return load_params(root / "params.yaml")


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_an_unreachable_tracking_server_stops_the_stage_in_seconds(tmp_path, clean_env, server):
    """Issue 28: with tracking.tracking_uri http://127.0.0.1:9 a stage printed nothing for 253 s
    (MLflow's HTTP retries), then failed.  Now it asks the server first, tracking.connect_timeout_s
    at most (5 s by default), and stops with one line naming the URI.  "silent": a server that
    accepts the connection and never answers."""
    import socket
    import subprocess
    import sys
    import time

    import yaml

    repo = Path(__file__).resolve().parents[1]
    listener = None
    if server == "refused":
        with socket.socket() as probe:  # a free port, closed again: connecting is refused at once
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tracking"]["tracking_uri"] = f"http://127.0.0.1:{port}"
    assert params["tracking"]["connect_timeout_s"] == 5.0  # the default is what is tested
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, str(repo / "stages" / "splits.py"), "--params", "params.yaml"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        if listener is not None:
            listener.close()
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert elapsed <= 15, f"{elapsed:.1f} s"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"splits: error: tracking URI http://127.0.0.1:{port}: no MLflow server answers")
    assert not (tmp_path / "data").exists()  # no work was done


def test_every_stage_run_carries_the_machine_it_ran_on(store_root, clean_env):
    """stage_tags, the one place every stage run gets its common tags, adds machine.* (issue 29)."""
    from simprop.infra.machine import machine_tags

    with stage_run("splits", _params(), repo_root=store_root) as run:
        run_id = run.run_id
    tags = _client(f"sqlite:///{store_root / 'mlflow.db'}").get_run(run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("machine.")} == machine_tags()
    assert {"machine.cpu_model", "machine.cpu_native_bf16", "machine.torch", "machine.gpu"} <= set(tags)
