"""The whole DAG through the real `dvc repro` in a temporary git repo, browsed through a real
`mlflow server`; then what a user does next: change a param, kill a training, feed bad input.

Nothing is mocked: DVC, git and MLflow run as the user would run them, on a tiny generated
dataset and a narrow network so the module takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow_server import (  # tests/ is on sys.path under pytest
    start_server,
    stop_server,
)

from simprop.infra.parallel import threads_per_worker

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["canet", "dpr", "fbaf", "dpr_fbaf", "simpropnet"]
FOLDS = [0, 1]  # two, so that the train and evaluate stages run their folds side by side (parallel_folds: 2)
SEEDS = [0, 1]  # two training replicates: the report's spread over seeds and its claims intervals

pytestmark = pytest.mark.slow


def tiny_params() -> dict:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["synthetic"].update(num_sbd_images=200, num_voc_images=240, width=128, height=96)
    params["data"]["workers"] = 2
    params["splits"]["folds"] = FOLDS
    params["episodes"].update(num_episodes=20, num_val_episodes=10)
    params["backbone"]["calibration_images"] = 16
    params["model"]["channels"] = 8
    params["train"].update(
        variants=VARIANTS, folds=FOLDS, epochs=2, iterations_per_epoch=3, batch_size=4, image_size=33,
        lr=0.01, device="cpu", seeds=SEEDS,
    )  # fmt: skip
    params["evaluate"].update(image_size=33, batch_size=8, device="cpu")
    params["report"]["num_qualitative"] = 2
    params["analysis"].update(
        variant="simpropnet", fold=0, background_pairs_per_class=2, error_pairs=10, overlap_episodes=10,
        supervised_weights="none",
    )  # fmt: skip
    return params


def git_env() -> dict[str, str]:
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }


def run(cmd: list[str], repo: Path, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = git_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(repo)  # stages import the repo's own simprop/ (the code DVC hashes), not the installed one
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


DVC = [sys.executable, "-m", "dvc"]


def make_repo(path: Path) -> Path:
    """A git + DVC repository holding this project (code, dvc.yaml, tiny params)."""
    path.mkdir()
    for name in ("simprop", "stages", "conf"):
        shutil.copytree(REPO_ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO_ROOT / name, path / name)
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    run(["git", "init", "-q"], path)
    run([*DVC, "init", "-q"], path)
    shutil.copy(REPO_ROOT / ".dvc" / "config", path / ".dvc" / "config")
    shutil.copy(REPO_ROOT / ".dvcignore", path / ".dvcignore")  # __pycache__ is not part of a code dep
    # the tiny params are written by hand here, not composed from conf/: keep DVC from recomposing
    run([*DVC, "config", "hydra.enabled", "False"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "tiny pipeline"], path)
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("dag") / "repo")
    result = run([*DVC, "repro"], repo, timeout=1500)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    return repo


def test_repro_runs_every_stage_and_leaves_nothing_to_do(pipeline):
    status = run([*DVC, "status", "--json"], pipeline)
    assert json.loads(status.stdout) == {}
    for variant in VARIANTS:
        for fold in FOLDS:
            assert (pipeline / "models" / variant / f"fold{fold}" / "seed0" / "best.pt").is_file()
            record = json.loads((pipeline / "metrics" / "evaluate" / variant / f"fold{fold}" / "seed0.json").read_text())
            for shot in (1, 5):
                entry = record[f"shot{shot}"]
                assert 0.0 <= entry["miou_mean"] <= 100.0
                assert sorted(k for k in entry if k.startswith("seed")) == ["seed1", "seed2", "seed3"]
            assert record["episodes"] == 20 and record["resolution"] == "original"
            assert 0.0 <= record["identical"]["miou"] <= 100.0
            assert record["reference"]["all_foreground_miou"] > 0.0
    for fold in FOLDS:  # scored once per fold by the evaluate stage, the same in every variant's record
        matchers = [json.loads((pipeline / "metrics" / "evaluate" / v / f"fold{fold}" / "seed0.json").read_text())["matcher"]
                    for v in VARIANTS]  # fmt: skip
        assert all(m == matchers[0] for m in matchers) and set(matchers[0]) == {"shot1", "shot5"}
    tables = (pipeline / "reports" / "tables.md").read_text()
    assert "Table 3" in tables and "Table 4" in tables and "Table 5" in tables
    assert "54.86" in tables  # the paper's SimPropNet split-1 number sits beside ours
    # every (variant, fold) was trained and evaluated once per training seed, and the report reads them all
    for variant, fold, seed in ((v, f, s) for v in VARIANTS for f in FOLDS for s in SEEDS):
        record = json.loads((pipeline / "metrics" / "evaluate" / variant / f"fold{fold}" / f"seed{seed}.json").read_text())
        assert record["train_seed"] == seed
        assert (pipeline / "models" / variant / f"fold{fold}" / f"seed{seed}" / "best.pt").is_file()
    summary = json.loads((pipeline / "metrics" / "report.json").read_text())
    assert summary["num_train_seeds"] == len(SEEDS)
    lists = summary["claims_lists"]
    assert sum(len(v) for v in lists.values()) == 9 and not lists["not run"]
    assert "## The paper's claims" in tables and "**Undecided**" in tables
    shown = run([*DVC, "metrics", "show", "--json"], pipeline)
    assert "metrics/evaluate/simpropnet/fold0/seed0.json" in shown.stdout


def test_every_train_and_evaluate_run_is_browsable_in_mlflow(pipeline):
    server = start_server(pipeline / ".mlflow-server", db=pipeline / "mlflow.db")
    try:
        experiments = server.post("/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        experiment = next(e for e in experiments if e["name"] == "simprop")
        runs = server.post(
            "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 500}
        )["runs"]

        def tags(run: dict) -> dict:
            return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

        for stage in ("download", "augment", "splits", "episodes", "backbone", "features", "report",
                      "analysis_background", "analysis_error_similarity", "analysis_error_overlap"):
            assert any(tags(r).get("stage") == stage and r["info"]["status"] == "FINISHED" for r in runs), stage
        for variant, fold, seed in ((v, f, s) for v in VARIANTS for f in FOLDS for s in SEEDS):
                for stage, metric in (("train", "best_val_miou"), ("evaluate", "shot1_miou_mean")):
                    found = [
                        r for r in runs
                        if tags(r).get("stage") == stage and tags(r).get("variant") == variant
                        and tags(r).get("fold") == str(fold) and tags(r).get("train_seed") == str(seed)
                        and r["info"]["status"] == "FINISHED"
                    ]  # fmt: skip
                    assert found, f"no finished {stage} run for {variant} fold {fold} seed {seed}"
                    run_info = found[0]
                    # the replicates of a (variant, fold) are grouped by name and tag
                    assert run_info["info"]["run_name"].startswith(f"{stage}/{variant}/fold{fold}/seed{seed}")
                    assert tags(run_info)["replicate_group"] == f"{stage}/{variant}/fold{fold}"
                    metrics = {m["key"] for m in run_info["data"].get("metrics", [])}
                    assert metric in metrics
                    assert tags(run_info)["protocol"] == "oslsm"
                    # the folds ran side by side, each in a worker with its share of the cores
                    assert tags(run_info)["torch_threads"] == str(threads_per_worker(2))
                    assert tags(run_info)["dvc_stage"] == stage
                    if stage == "evaluate":  # the matcher, scored once per fold, is in every variant's run
                        assert {"matcher_shot1_miou_mean", "matcher_shot1_seed1_miou", "matcher_shot5_seed3_fbiou"} <= metrics
                    listing = server.get(
                        "/api/2.0/mlflow/artifacts/list", run_id=run_info["info"]["run_id"]
                    ).get("files", [])
                    names = {f["path"] for f in listing}
                    assert "params.yaml" in names
                    if stage == "train":
                        assert "checkpoint" in names
                        history = server.get(
                            "/api/2.0/mlflow/metrics/get-history", run_id=run_info["info"]["run_id"],
                            metric_key="train_loss",
                        )["metrics"]  # fmt: skip
                        assert len(history) == 6  # 2 epochs x 3 iterations, one point per step
    finally:
        stop_server(server)


def test_changing_the_learning_rate_reruns_training_and_nothing_upstream(pipeline):
    params_path = pipeline / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["train"]["lr"] = 0.005
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = json.loads(run([*DVC, "status", "--json"], pipeline).stdout)
    finally:
        params_path.write_text(original)
    trainings = {"train"}
    assert trainings <= set(changed), "every training must rerun"
    upstream = {"download", "augment", "splits", "episodes", "backbone", "features"}
    assert not upstream & set(changed), f"upstream stages must not rerun: {sorted(upstream & set(changed))}"
    assert set(changed) - trainings <= {"report"}  # evaluate reruns later, when the checkpoints change
    for name in trainings:
        assert "train.lr" in json.dumps(changed[name])


def test_scoring_and_sampling_params_dirty_exactly_the_stages_that_read_them(pipeline):
    """Issue 10: `dvc exp run -S evaluate.resolution=321` (or evaluate.void, or another episode
    sampling) must rerun what reads the key and nothing more: the keys are declared in dvc.yaml."""
    params_path = pipeline / "params.yaml"
    original = params_path.read_text()
    evaluations = {"evaluate"}
    trainings = {"train"}
    try:
        for section, key, value in (("evaluate", "resolution", "321"), ("evaluate", "void", "background")):
            params = yaml.safe_load(original)
            params[section][key] = value
            params_path.write_text(yaml.safe_dump(params, sort_keys=False))
            changed = json.loads(run([*DVC, "status", "--json"], pipeline).stdout)
            assert set(changed) == evaluations | {"report"}, (key, sorted(changed))
        params = yaml.safe_load(original)
        params["episodes"]["class_sampling"] = "uniform"
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = json.loads(run([*DVC, "status", "--json"], pipeline).stdout)
        assert {"episodes", "report"} | evaluations <= set(changed) and not trainings & set(changed)
    finally:
        params_path.write_text(original)


def test_bad_params_fail_before_any_work(pipeline, tmp_path):
    repo = pipeline
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["train"]["lr"] = -1.0
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    before = sorted(p.name for p in (repo / "models").iterdir())
    try:
        result = run([sys.executable, "stages/train.py", "--variant", "canet", "--fold", "0"], repo, check=False)
    finally:
        params_path.write_text(original)
    assert result.returncode == 2
    assert "train.lr" in result.stderr
    assert sorted(p.name for p in (repo / "models").iterdir()) == before


def _evaluate_without(repo: Path, path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the fbaf fold-0 evaluation with ``path`` moved away (and put back afterwards)."""
    saved = tmp_path / path.name
    shutil.move(path, saved)
    try:
        return run([sys.executable, "stages/evaluate.py", "--variant", "fbaf", "--fold", "0"], repo, check=False)
    finally:
        shutil.move(saved, path)


def test_missing_checkpoint_and_episode_file_give_clear_errors(pipeline, tmp_path):
    repo = pipeline
    result = _evaluate_without(repo, repo / "models" / "fbaf" / "fold0" / "seed0" / "best.pt", tmp_path)
    assert result.returncode == 2
    assert "best.pt" in result.stderr and "does not exist" in result.stderr

    result = _evaluate_without(repo, repo / "data" / "episodes" / "fold0" / "test_seed2.csv", tmp_path)
    assert result.returncode == 2
    assert "test_seed2.csv" in result.stderr


def _mlflow_runs(repo: Path, stage: str, variant: str, seed: int = 0) -> list:
    """The runs of ``stage`` for ``variant`` and training seed ``seed`` (the stages train every seed), newest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("simprop")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.stage = '{stage}' and tags.variant = '{variant}' and tags.train_seed = '{seed}'",
        order_by=["attributes.start_time DESC"],
    )


def test_a_diverging_training_stops_with_a_clear_message_and_a_failed_run(pipeline):
    repo = pipeline
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["train"]["lr"] = 1e30
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    model_dir = repo / "models" / "dpr" / "fold0" / "seed0"
    saved = repo.parent / "dpr_fold0_saved"
    shutil.copytree(model_dir, saved)
    try:
        result = run([sys.executable, "stages/train.py", "--variant", "dpr", "--fold", "0"], repo, check=False)
    finally:
        params_path.write_text(original)
        shutil.rmtree(model_dir)
        shutil.copytree(saved, model_dir)
    assert result.returncode == 2
    assert "loss is nan" in result.stderr.lower() or "loss is inf" in result.stderr.lower()
    assert "train.lr" in result.stderr
    latest = _mlflow_runs(repo, "train", "dpr")[0]
    assert latest.info.status == "FAILED"
    assert "TrainingDiverged" in latest.data.tags["error"]


def test_a_killed_training_resumes_from_its_last_completed_epoch(pipeline):
    repo = pipeline
    model_dir = repo / "models" / "simpropnet" / "fold0" / "seed0"
    saved = repo.parent / "simpropnet_fold0_saved"
    shutil.copytree(model_dir, saved)
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["train"]["epochs"] = 200  # long enough to be killed mid-run
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(model_dir)
    state_file = model_dir / "state.json"
    env = git_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(repo)  # the repo's own simprop/, as run() does
    try:
        proc = subprocess.Popen(
            [sys.executable, "stages/train.py", "--variant", "simpropnet", "--fold", "0"],
            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        completed = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if state_file.is_file():
                try:
                    completed = json.loads(state_file.read_text())["completed_epochs"]
                except (ValueError, KeyError):
                    completed = 0
                if completed >= 3:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "training finished or crashed before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = json.loads(state_file.read_text())["completed_epochs"]
        assert killed_at >= 3

        params["train"]["epochs"] = killed_at + 2
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        result = run([sys.executable, "stages/train.py", "--variant", "simpropnet", "--fold", "0"], repo)
        assert f"after completed epoch {killed_at}" in result.stdout
        summary = json.loads((repo / "metrics" / "train" / "simpropnet" / "fold0" / "seed0.json").read_text())
        assert summary["resumed_from_epoch"] == killed_at + 1
        steps = [int(line.split(",")[0]) for line in
                 (repo / "plots" / "train" / "loss" / "simpropnet" / "fold0" / "seed0.csv").read_text().splitlines()[1:]]  # fmt: skip
        assert steps == list(range((killed_at + 2) * 3)), "the loss curve must continue without gaps or repeats"
        assert json.loads(state_file.read_text())["completed_epochs"] == killed_at + 2
        # MLflow: the SIGKILLed run does not stay RUNNING, and the two runs name each other
        resumed, killed = _mlflow_runs(repo, "train", "simpropnet")[:2]
        assert resumed.info.status == "FINISHED"
        assert killed.info.status == "KILLED" and killed.info.end_time is not None
        assert killed.data.tags["replaced_by_run"] == resumed.info.run_id
        assert resumed.data.tags["replaces_run"] == killed.info.run_id
        assert resumed.data.tags["resumed_from_run"] == killed.info.run_id  # recorded in last.pt
        assert resumed.data.tags["resumed_from_epoch"] == str(killed_at + 1)
    finally:
        params_path.write_text(original)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(saved, model_dir)


def _loss_curve(repo: Path, variant: str) -> list[float]:
    lines = (repo / "plots" / "train" / "loss" / variant / "fold0" / "seed0.csv").read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]


def test_ddp_training_through_torchrun_matches_one_process_and_only_rank0_writes(pipeline):
    """train.processes=2 relaunches the stage under torchrun (gloo on the CPU): the two ranks
    split every batch, rank 0 alone logs one MLflow run, and the loss curve is the one
    process' curve (same samples, averaged gradients; dropout off so both are comparable)."""
    repo = pipeline
    variant = "dpr_fbaf"
    model_dir = repo / "models" / variant / "fold0" / "seed0"
    saved = repo.parent / f"{variant}_fold0_saved_ddp"
    shutil.copytree(model_dir, saved)
    curve_path = repo / "plots" / "train" / "loss" / variant / "fold0" / "seed0.csv"
    saved_curve = curve_path.read_text()
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["model"]["dropout"] = 0.0
    cmd = [sys.executable, "stages/train.py", "--variant", variant, "--fold", "0"]
    try:
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.rmtree(model_dir)
        run(cmd, repo)
        single = _loss_curve(repo, variant)
        runs_before = len(_mlflow_runs(repo, "train", variant))

        params["train"]["processes"] = 2
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.rmtree(model_dir)
        result = run(cmd, repo)
        assert "torch.distributed.run" in result.stdout and "--nproc_per_node=2" in result.stdout
        double = _loss_curve(repo, variant)
        assert (model_dir / "best.pt").is_file() and (model_dir / "last.pt").is_file()
        summary = json.loads((repo / "metrics" / "train" / variant / "fold0" / "seed0.json").read_text())
        assert summary["processes"] == 2 and summary["steps"] == 6
        runs = _mlflow_runs(repo, "train", variant)
        assert len(runs) == runs_before + 1, "rank 1 must not open an MLflow run"
        assert runs[0].info.status == "FINISHED" and runs[0].data.tags["processes"] == "2"

        assert len(double) == len(single) == 6
        # The first loss is computed before any update: equal up to how the two ranks' pixel
        # means are combined (their halves hold different numbers of void pixels).
        assert double[0] == pytest.approx(single[0], rel=0.02)
        assert double == pytest.approx(single, rel=0.1)
    finally:
        params_path.write_text(original)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(saved, model_dir)
        curve_path.write_text(saved_curve)


def test_dvc_exp_run_temp_with_another_learning_rate_lands_in_the_original_mlflow_store(pipeline):
    """A real `dvc exp run --temp -S train.lr=...`: DVC copies the repo to a temporary
    workspace, reruns every training and what depends on it there (nothing upstream), records
    the experiment, and the MLflow runs of that copy land in the original repository's store
    with their artifacts under its mlartifacts/, tagged with the experiment's name."""
    repo = pipeline
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny pipeline results"], repo)
    before = {r.info.run_id for v in VARIANTS for r in _mlflow_runs(repo, "train", v)}
    params_before = (repo / "params.yaml").read_text()

    result = run([*DVC, "exp", "run", "--temp", "-n", "lr-half", "-S", "train.lr=0.005"], repo, timeout=1200)
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")}
    trainings = {"train"}
    assert trainings <= ran
    assert not ran & {"download", "augment", "splits", "episodes", "backbone", "features"}
    assert (repo / "params.yaml").read_text() == params_before, "--temp leaves the workspace alone"

    shown = json.loads(run([*DVC, "exp", "show", "--json"], repo).stdout)
    experiments = [
        exp for commit in shown for exp in (commit.get("experiments") or [])
        if exp.get("name") == "lr-half"
    ]  # fmt: skip
    assert experiments, "the experiment is recorded"
    data = experiments[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.005
    assert "metrics/report.json" in data["metrics"]

    for variant in VARIANTS:
        new = [r for r in _mlflow_runs(repo, "train", variant) if r.info.run_id not in before]
        assert sorted(r.data.tags["fold"] for r in new) == [str(f) for f in FOLDS], f"one new train run per fold for {variant}"
        tracked = new[0]
        assert tracked.info.status == "FINISHED"
        assert tracked.data.params["train.lr"] == "0.005"
        assert tracked.data.tags["dvc_exp_name"] == "lr-half"
        assert tracked.info.artifact_uri.startswith((repo / "mlartifacts").as_uri()) or tracked.info.artifact_uri.startswith(
            str(repo / "mlartifacts")
        )
        checkpoint = Path(tracked.info.artifact_uri.removeprefix("file://")) / "checkpoint" / "best.pt"
        assert checkpoint.is_file(), "artifacts survive the deletion of the temporary workspace"


def test_a_rebuilt_backbone_never_resumes_a_stale_checkpoint(pipeline):
    """models/ is persisted for resuming, so a rebuilt frozen backbone (same params for the
    train stage, other weights) must not resume the old last.pt: the resume fingerprint holds
    the backbone's sha256."""
    repo = pipeline
    variant = "fbaf"
    keep = {
        repo / "models" / variant / "fold0" / "seed0": repo.parent / "stale_model",
        repo / "backbone": repo.parent / "stale_backbone",
        repo / "data" / "features": repo.parent / "stale_features",
    }
    for src, dst in keep.items():
        shutil.copytree(src, dst)
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["backbone"]["seed"] = 1  # another random backbone at the same path
    try:
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        run([sys.executable, "stages/backbone.py"], repo)
        run([sys.executable, "stages/features.py"], repo)
        params_path.write_text(original)  # the train stage's own params are unchanged
        result = run([sys.executable, "stages/train.py", "--variant", variant, "--fold", "0"], repo)
        assert "was trained with other params, data, backbone or code; starting from scratch" in result.stdout
        assert "resuming" not in result.stdout
        summary = json.loads((repo / "metrics" / "train" / variant / "fold0" / "seed0.json").read_text())
        assert summary["steps"] == 6 and summary["resumed_from_epoch"] is None
    finally:
        params_path.write_text(original)
        for src, dst in keep.items():
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(dst, src)
            shutil.rmtree(dst)


def test_a_finished_training_rerun_rewrites_its_outputs_and_changed_code_starts_over(pipeline):
    """DVC deletes a stage's non-persisted outputs before rerunning it (`dvc repro -f`, a code
    change): a finished run resumed with no epoch left still writes its curves, and a change
    of the training code never resumes the old last.pt."""
    repo = pipeline
    variant = "dpr"
    model_dir = repo / "models" / variant / "fold0" / "seed0"
    saved = repo.parent / "dpr_fold0_saved_rerun"
    shutil.copytree(model_dir, saved)
    curves = [repo / "plots" / "train" / kind / variant / "fold0" / "seed0.csv" for kind in ("loss", "val")]
    contents = [c.read_text() for c in curves]
    losses = repo / "simprop" / "model" / "losses.py"
    code = losses.read_text()
    cmd = [sys.executable, "stages/train.py", "--variant", variant, "--fold", "0"]
    try:
        for curve in curves:
            curve.unlink()
        result = run(cmd, repo)
        assert "after completed epoch 2" in result.stdout
        assert [c.read_text() for c in curves] == contents, "the curves come back from the checkpoint's history"

        losses.write_text(code + "\n# a change to the training code\n")
        result = run(cmd, repo)
        assert "was trained with other params, data, backbone or code; starting from scratch" in result.stdout
        assert json.loads((repo / "metrics" / "train" / variant / "fold0" / "seed0.json").read_text())["resumed_from_epoch"] is None
    finally:
        losses.write_text(code)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(saved, model_dir)
        for curve, text in zip(curves, contents):
            curve.write_text(text)


# --------------------------------------------------------------------------- faults (docs/reliability.md)


def _swap_in(path: Path, write) -> Path:
    """Move ``path`` aside (never write through it: DVC may hard-link it to its cache) and let
    ``write(path)`` put another file there; returns where the original waits."""
    saved = path.with_name(path.name + ".saved")
    os.replace(path, saved)
    write(path)
    return saved


def _restore(path: Path, saved: Path) -> None:
    path.unlink(missing_ok=True)
    os.replace(saved, path)


def test_evaluate_refuses_a_checkpoint_of_another_fold(pipeline):
    """Issue 11, scenario 1: fold 1's best.pt copied over fold 0's used to be evaluated silently
    (its training saw fold 0's test classes). Here fold 0's checkpoint is re-labelled fold 1, as
    a copy of a fold-1 checkpoint would be."""
    import torch

    repo = pipeline
    best = repo / "models" / "canet" / "fold0" / "seed0" / "best.pt"
    metrics = repo / "metrics" / "evaluate" / "canet" / "fold0" / "seed0.json"
    before = metrics.read_bytes()
    payload = torch.load(best, weights_only=True)
    identity = payload.get("identity") or {}  # recorded by training (checked at the end)
    assert payload["meta"]["fold"] == 0
    payload["meta"]["fold"] = 1  # what a fold-1 checkpoint records
    if identity:
        assert identity["fold"] == 0 and identity["protocol"] == "oslsm"
        identity["fold"] = 1
    saved = _swap_in(best, lambda p: torch.save(payload, p))
    try:
        result = run([sys.executable, "stages/evaluate.py", "--variant", "canet", "--fold", "0"], repo, check=False)
    finally:
        _restore(best, saved)
        if metrics.read_bytes() != before:  # only an evaluation that should not have run rewrites it
            metrics.write_bytes(before)
    assert result.returncode == 2, result.stdout[-2000:]
    err = result.stderr
    assert "Traceback" not in err
    assert "models/canet/fold0/seed0/best.pt holds a 'canet' model of fold 1, training seed 0" in err
    assert "expected a 'canet' model of fold 0" in err and "fold 1 != expected 0" in err
    assert "1 aeroplane" in err  # what the fold-1 model has seen in training
    assert identity, "training records the checkpoint's identity"


@pytest.mark.parametrize(
    "edit, rule",
    [
        (lambda f, other: [f[0], other, *f[2:]], "is not in"),  # a fold-1 test image as the query
        (lambda f, other: f[:2] + ["6"] + f[3:], "class 6 is not one of fold 0's classes"),
    ],
    ids=["other-fold-query", "class-6"],
)
def test_evaluate_refuses_a_tampered_episode_file(pipeline, edit, rule):
    """Issue 28, scenario 2: a hand-edited test episode file was scored by the evaluate stage run
    directly (exit 0, new metrics); a class id of 6 gave a ValueError traceback."""
    repo = pipeline
    episodes = repo / "data" / "episodes" / "fold0" / "test_seed1.csv"
    other = (repo / "data" / "splits" / "fold1" / "test.csv").read_text().splitlines()[1].split(",")[0]
    metrics = repo / "metrics" / "evaluate" / "canet" / "fold0" / "seed0.json"
    before = metrics.read_bytes()

    def write(path: Path) -> None:
        lines = path.with_name(path.name + ".saved").read_text().splitlines()
        lines[3] = ",".join(edit(lines[3].split(","), other))  # line 4 of the file
        path.write_text("\n".join(lines) + "\n")

    saved = _swap_in(episodes, write)
    try:
        result = run([sys.executable, "stages/evaluate.py", "--variant", "canet", "--fold", "0"], repo, check=False)
    finally:
        _restore(episodes, saved)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "data/episodes/fold0/test_seed1.csv, line 4: " in result.stderr and rule in result.stderr
    assert metrics.read_bytes() == before  # nothing was scored


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plain_pickle(payload, path: Path) -> None:
    with open(path, "wb") as fh:
        pickle.dump(payload, fh)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("name, stage", [("last.pt", "train"), ("best.pt", "evaluate")])
def test_a_crafted_checkpoint_runs_no_code(pipeline, name, stage, writer):
    """Issue 11, scenario 2: a pickle whose __reduce__ runs a shell command, saved as last.pt
    (resumed by train) or best.pt (read by evaluate): nothing runs, the stage stops naming it.
    Issue 28: a plain pickle (not torch's format) is refused the same way, not "unreadable ...
    starting from scratch", and no message passes on torch's advice to set weights_only=False."""
    import torch

    repo = pipeline
    marker = repo.parent / f"code-ran-{name}-{writer}"
    path = repo / "models" / "dpr" / "fold0" / "seed0" / name
    save = torch.save if writer == "torch.save" else _plain_pickle
    saved = _swap_in(path, lambda p: save({"epoch": 1, "model": _RunsCode(marker)}, p))
    try:
        result = run([sys.executable, f"stages/{stage}.py", "--variant", "dpr", "--fold", "0"], repo, check=False)
    finally:
        _restore(path, saved)
    assert not marker.exists(), "the pickled command ran"
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"models/dpr/fold0/seed0/{name} is not a safe checkpoint" in result.stderr
    assert "Nothing in it was run" in result.stderr
    advice = ("weights_only=False", "`weights_only` set to `False`", "safe_globals")  # torch's, never passed on
    assert not any(a in result.stderr + result.stdout for a in advice)


def test_sigterm_during_download_marks_the_run_killed_and_leaves_no_temporary(pipeline):
    """Issue 11, scenario 4: a SIGTERMed stage used to leave its MLflow run RUNNING."""
    repo = pipeline
    raw = repo / "data" / "raw"
    before = sorted(p.name for p in raw.iterdir())
    env = git_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(repo)
    proc = subprocess.Popen([sys.executable, "stages/download.py"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(raw.parent.glob("raw.tmp-*")):
        time.sleep(0.01)
    assert proc.poll() is None, "the download stage ended before it could be terminated"
    time.sleep(0.3)  # inside the generation
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "download: terminated by SIGTERM; its MLflow run is marked KILLED" in err and "Traceback" not in err
    assert not list(raw.parent.glob("raw.tmp-*")), "the temporary tree is removed"
    assert sorted(p.name for p in raw.iterdir()) == before
    latest = _mlflow_runs_of_stage(repo, "download")[0]
    assert latest.info.status == "KILLED" and "StageTerminated" in latest.data.tags["error"]


def _mlflow_runs_of_stage(repo: Path, stage: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("simprop")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time DESC"])  # fmt: skip


def test_features_stage_on_a_truncated_jpeg_fails_clearly_and_leaves_no_temporary(pipeline):
    """Issue 11, scenario 5: a traceback and data/features.tmp left behind."""
    repo = pipeline
    images = repo / "data" / "raw" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    first = (repo / "data" / "splits" / "fold0" / "train.csv").read_text().splitlines()[1].split(",")[0]
    victim = images / f"{first}.jpg"
    data = victim.read_bytes()
    features = repo / "data" / "features"
    before = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    saved = _swap_in(victim, lambda p: p.write_bytes(data[: len(data) // 3]))
    try:
        result = run([sys.executable, "stages/features.py"], repo, check=False)
    finally:
        _restore(victim, saved)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("features: error: ") and victim.name in last and "unreadable image" in last
    assert "Traceback" not in result.stderr
    assert not (repo / "data" / "features.tmp").exists()
    assert {p.name: p.stat().st_mtime_ns for p in features.iterdir()} == before, "the old cache is untouched"
    assert _mlflow_runs_of_stage(repo, "features")[0].info.status == "FAILED"


def test_both_training_curves_and_the_experiment_kind_are_served_over_rest(pipeline):
    """Issue 11, scenario 7 and the UI: the loss and validation CSVs are distinct artifacts of
    every train run, and the experiment is a model-training one (MLflow 3 opens its runs table)."""
    server = start_server(pipeline / ".mlflow-server-curves", db=pipeline / "mlflow.db")
    try:
        experiment = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="simprop")["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        # the README links the runs table of experiment 1: the first one the pipeline creates
        readme = (REPO_ROOT / "README.md").read_text()
        assert "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning" in readme
        assert experiment["experiment_id"] == "1"
        runs = server.post("/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment["experiment_id"]], "max_results": 500,
            "filter": "tags.stage = 'train' and attributes.status = 'FINISHED'",
        })["runs"]  # fmt: skip
        seen = set()
        for found in runs:
            run_tags = {t["key"]: t["value"] for t in found["data"]["tags"]}
            name = f"seed{run_tags['train_seed']}.csv"  # one folder per curve and run: the replicate's seed
            listed = {}
            for kind in ("loss", "val"):
                files = server.get("/api/2.0/mlflow/artifacts/list", run_id=found["info"]["run_id"],
                                   path=f"curves/{kind}").get("files", [])  # fmt: skip
                listed[kind] = {f["path"]: f.get("file_size") for f in files}
            assert set(listed["loss"]) == {f"curves/loss/{name}"}, listed
            assert set(listed["val"]) == {f"curves/val/{name}"}, listed
            seen.add(run_tags["variant"])
        assert seen == set(VARIANTS)
    finally:
        stop_server(server)
