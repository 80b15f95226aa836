"""A tracking server that goes away during a stage (issue 28): the work goes on, nothing is lost.

Against a real ``mlflow server`` on 127.0.0.1 that the tests stop and start again on the same port
and store: a training whose server restarts mid-run ends with every metric in its MLflow run (the
same values as metrics/train and plots/train); a run whose server is still away at its end saves
what the server did not take, and ``simprop mlflow-sync`` completes the run from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from mlflow_server import start_server, stop_server

from simprop.params import TrackingParams

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

pytestmark = pytest.mark.slow


def _history(server, run_id: str, key: str) -> list[tuple[int, float]]:
    found = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key, max_results=25000)
    return sorted((int(m["step"]), float(m["value"])) for m in found.get("metrics", []))


def _run_of(server, name: str) -> dict:
    experiments = server.get("/api/2.0/mlflow/experiments/search", max_results=100)["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    runs = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": ids, "max_results": 100})["runs"]
    matches = [r for r in runs if r["info"]["run_name"] == name]
    assert len(matches) == 1, [r["info"]["run_name"] for r in runs]
    return matches[0]


def test_a_server_restart_mid_training_loses_no_metric(feature_cache_tree, tmp_path, monkeypatch, capsys):
    from simprop.layout import RunLayout
    from simprop.train.fold import train_fold

    params, root, _ = feature_cache_tree(
        model={"channels": 8}, train={"image_size": 33, "batch_size": 4, "epochs": 6, "iterations_per_epoch": 6}
    )
    server = start_server(tmp_path / "server")
    port = int(server.url.rsplit(":", 1)[1])
    params = dataclasses.replace(params, tracking=TrackingParams(experiment="outage", tracking_uri=server.url))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    layout = RunLayout(root, "canet", 0, params.train.seed)  # the replicate train_fold trains
    loss_curve = layout.loss_curve
    restarted: list = []

    def outage() -> None:  # down once the first epoch is logged, back 4 s later, same port and store
        deadline = time.monotonic() + 300
        while not loss_curve.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_server(server)
        time.sleep(4)
        restarted.append(start_server(server.root, port=port))

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        summary = train_fold(params, "canet", 0, root)
        thread.join(timeout=120)
        assert restarted, "the server did not come back"
        back = restarted[0]
        err = capsys.readouterr().err
        assert f"the MLflow server {server.url} did not take a log call" in err  # the outage hit the run
        assert "answers again: every kept log call" in err or "mlflow-sync" not in err
        run = _run_of(back, f"train/canet/fold0/seed{params.train.seed}/1shot")
        assert run["info"]["status"] == "FINISHED"
        losses = [(int(s), float(v)) for s, v in (line.split(",") for line in loss_curve.read_text().splitlines()[1:])]
        assert _history(back, run["info"]["run_id"], "train_loss") == losses  # every step's loss, once
        val_curve = layout.val_curve
        vals = [(int(e), float(v)) for e, v in (line.split(",") for line in val_curve.read_text().splitlines()[1:])]
        assert _history(back, run["info"]["run_id"], "val_miou") == pytest.approx(vals)
        assert len(vals) == summary["epochs"] == 6
        recorded = json.loads(layout.train_metrics.read_text())
        assert _history(back, run["info"]["run_id"], "best_val_miou")[-1][1] == pytest.approx(recorded["best_val_miou"])
    finally:
        for s in restarted:
            stop_server(s)
        stop_server(server)


def test_a_run_that_ends_while_its_server_is_away_is_completed_by_mlflow_sync(tmp_path, monkeypatch, capsys):
    """The server stays away past the run's end: the kept calls and the FINISHED status go to
    .simprop/mlflow-pending/<run>.json, the message names ``simprop mlflow-sync``, which completes
    the run once the server is back."""
    from simprop.infra.tracking import run as run_module
    from simprop.infra.tracking import stage_run
    from simprop.params import Params

    monkeypatch.setattr(run_module, "FLUSH_WAIT_S", 0.1)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    server = start_server(tmp_path / "server")
    port = int(server.url.rsplit(":", 1)[1])
    params = dataclasses.replace(Params(), tracking=TrackingParams(experiment="away", tracking_uri=server.url))
    repo = tmp_path / "repo"
    repo.mkdir()
    back = None
    try:
        with stage_run("evaluate", params, variant="dpr", fold=0, repo_root=repo) as run:
            run.log_metrics({"miou": 50.0}, step=1)
            stop_server(server)
            run.log_metrics({"miou": 60.0}, step=2)  # kept
            run.set_tags({"checkpoint_epoch": 3})  # kept, behind it
            run_id = run.run_id
        err = capsys.readouterr().err
        pending = repo / ".simprop" / "mlflow-pending" / f"{run_id}.json"
        assert pending.is_file() and f"simprop mlflow-sync {pending}" in err
        back = start_server(server.root, port=port)
        assert _run_of(back, "evaluate/dpr/fold0")["info"]["status"] == "RUNNING"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        sync = subprocess.run([sys.executable, "-m", "simprop.cli", "mlflow-sync", str(pending)], capture_output=True,
                              text=True, env=env, timeout=120)  # fmt: skip
        assert sync.returncode == 0, sync.stderr
        run_record = _run_of(back, "evaluate/dpr/fold0")
        assert run_record["info"]["status"] == "FINISHED" and not pending.exists()
        assert _history(back, run_id, "miou") == [(1, 50.0), (2, 60.0)]
        tags = {t["key"]: t["value"] for t in run_record["data"]["tags"]}
        assert tags["checkpoint_epoch"] == "3"
    finally:
        stop_server(server)
        if back is not None:
            stop_server(back)
