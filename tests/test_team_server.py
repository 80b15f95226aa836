"""A team's set-up, for real: ``mlflow server`` on PostgreSQL with proxied artifacts, the tiny
pipeline (``dvc repro``) pointed at it by ``tracking.tracking_uri`` alone, the model registry it
fills, and ``simprop segment --model models:/...`` reading from it.

PostgreSQL and the tracking server are started and stopped by the fixtures (tests/postgres.py);
the client side (the pipeline's stages, ``simprop segment``) reaches the server over HTTP only:
its artifacts live in a folder the tests never hand to a client, and every artifact URI must be
``mlflow-artifacts:``.  The pipeline is 2 variants x 1 fold x 1 training seed (about 2 minutes).
"""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from postgres import postgres, team_server  # noqa: F401  (fixtures)
from test_pipeline import DVC, git_env, make_repo, run, tiny_params

from simprop.model.checkpoint import held_out_classes

pytestmark = pytest.mark.slow

VARIANTS = ["canet", "simpropnet"]
STAGE_RUNS = ("download", "augment", "splits", "episodes", "backbone", "features", "train", "evaluate", "report",
              "analysis_background", "analysis_error_similarity", "analysis_error_overlap")  # fmt: skip


def small_params(tracking_uri: str) -> dict:
    params = tiny_params()
    params["splits"]["folds"] = [0]
    params["train"].update(variants=VARIANTS, folds=[0], seeds=[0])
    params["tracking"]["tracking_uri"] = tracking_uri
    return params


@pytest.fixture(scope="module")
def team_pipeline(team_server, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny pipeline reproduced with every stage tracked on the team server."""
    repo = make_repo(tmp_path_factory.mktemp("team") / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(small_params(team_server.url), sort_keys=False))
    run(["git", "commit", "-qam", "team server"], repo)
    result = run([*DVC, "repro"], repo, timeout=1200)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    return repo


def _client(team_server):  # noqa: F811
    import mlflow

    return mlflow.MlflowClient(tracking_uri=team_server.url, registry_uri=team_server.url)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_stage_run_and_its_artifacts_are_on_the_server(team_pipeline, team_server, tmp_path):  # noqa: F811
    client = _client(team_server)
    experiment = client.get_experiment_by_name("simprop")
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    for stage in STAGE_RUNS:
        assert any(r.data.tags.get("stage") == stage and r.info.status == "FINISHED" for r in runs), stage
    for r in runs:  # artifacts only through the server's proxy: the client has no path to them
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri
    # nothing tracked locally: no sqlite store, no artifact folder in the repository
    assert not (team_pipeline / "mlflow.db").exists() and not (team_pipeline / "mlartifacts").exists()
    for variant in VARIANTS:
        (evaluate,) = [r for r in runs if r.data.tags.get("stage") == "evaluate" and r.data.tags.get("variant") == variant]
        assert evaluate.data.tags["train_seed"] == "0" and evaluate.data.tags["fold"] == "0"
        local = team_pipeline / "metrics" / "evaluate" / variant / "fold0" / "seed0.json"
        got = Path(client.download_artifacts(evaluate.info.run_id, local.name, str(tmp_path / variant)))
        assert got.read_bytes() == local.read_bytes()  # downloaded through the proxy, byte for byte
        params = yaml.safe_load(Path(client.download_artifacts(evaluate.info.run_id, "params.yaml",
                                                               str(tmp_path / variant))).read_text())  # fmt: skip
        assert params["tracking"]["tracking_uri"] == team_server.url
    # ... and the server stored them in its --artifacts-destination
    assert any(p.name == "best.pt" for p in team_server.artifacts.rglob("best.pt"))


def test_every_evaluated_checkpoint_is_a_registered_version_with_its_aliases(team_pipeline, team_server, tmp_path):  # noqa: F811
    client = _client(team_server)
    runs = client.search_runs([client.get_experiment_by_name("simprop").experiment_id], "tags.stage = 'evaluate'")
    for variant in VARIANTS:
        name = f"simprop-{variant}"
        model = client.get_registered_model(name)
        assert set(model.aliases) == {"fold0", "fold0-seed0"}
        version = client.get_model_version_by_alias(name, "fold0")
        assert client.get_model_version_by_alias(name, "fold0-seed0").version == version.version
        assert {k: version.tags[k] for k in ("variant", "fold", "seed", "setup")} == {
            "variant": variant, "fold": "0", "seed": "0", "setup": "default"}  # fmt: skip
        best = team_pipeline / "models" / variant / "fold0" / "seed0" / "best.pt"
        assert version.tags["checkpoint_sha256"] == _sha256(best)
        (evaluate,) = [r for r in runs if r.data.tags["variant"] == variant]
        assert version.run_id == evaluate.info.run_id  # logged from the evaluate stage's run
        assert version.source.startswith("mlflow-artifacts:")
        import mlflow

        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / variant),
                                                          tracking_uri=team_server.url))  # fmt: skip
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        assert mlmodel["metadata"]["held_out_classes"] == held_out_classes(0)
        assert mlmodel["metadata"]["simprop_identity"]["variant"] == variant
        assert mlmodel["metadata"]["simprop_identity"]["fold"] == 0
        assert "python_function" in mlmodel["flavors"] and "signature" in mlmodel
        assert (folder / "input_example.json").is_file()
        assert _sha256(folder / "artifacts" / "best.pt") == _sha256(best)  # our weights-only file, as it is
        assert not list(folder.rglob("*.pkl"))  # nothing cloudpickled: the model is code + best.pt


def _support_and_query(repo: Path) -> tuple[Path, Path, int, Path]:
    """A support image, its VOC label and a class in it, and another image as the query."""
    labels = sorted((repo / "data" / "SegmentationClassAug").glob("*.png"))
    images = repo / "data" / "raw" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    for label in labels:
        values, counts = np.unique(np.asarray(Image.open(label)), return_counts=True)
        objects = [(c, v) for v, c in zip(values, counts) if 0 < v < 255]
        if objects and max(objects)[0] > 200 and (images / f"{label.stem}.jpg").is_file():
            query = next(p for p in sorted(images.glob("*.jpg")) if p.stem != label.stem)
            return images / f"{label.stem}.jpg", label, int(max(objects)[1]), query
    raise AssertionError("the tiny dataset has no labelled image with an object of > 200 pixels")


def _segment(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = git_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "simprop.cli", "segment", *args, "--device", "cpu", "--quiet"],
                          check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_segment_with_a_registered_model_writes_the_masks_its_checkpoint_gives(team_pipeline, team_server, tmp_path):  # noqa: F811
    support, label, class_id, query = _support_and_query(team_pipeline)
    common = ["--support", str(support), str(label), "--class-id", str(class_id), "--query", str(query)]
    result = _segment(["--model", "models:/simprop-simpropnet@fold0", "--tracking-uri", team_server.url,
                       *common, "--out", str(tmp_path / "registry")], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "models:/simprop-simpropnet@fold0 (version" in result.stdout and "1 aeroplane" in result.stdout
    mask = tmp_path / "registry" / f"{query.stem}_mask.png"
    assert np.asarray(Image.open(mask)).shape == np.asarray(Image.open(query)).shape[:2]
    # the same weights as the pipeline's own file: the same mask, pixel for pixel
    best = team_pipeline / "models" / "simpropnet" / "fold0" / "seed0" / "best.pt"
    # (run in the checkout: its best.pt names the backbone file relative to it, which the registry ships along)
    local = _segment(["--checkpoint", str(best), *common, "--out", str(tmp_path / "file")], team_pipeline)
    assert local.returncode == 0, local.stderr
    assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(tmp_path / "file" / mask.name)))
    # by version number too
    by_number = _segment(["--model", "models:/simprop-simpropnet/1", "--tracking-uri", team_server.url, *common,
                          "--out", str(tmp_path / "v1")], tmp_path)  # fmt: skip
    assert by_number.returncode == 0, by_number.stderr


def test_segment_names_a_wrong_alias_an_unknown_model_and_an_unreachable_server(team_pipeline, team_server, tmp_path):  # noqa: F811
    support, label, class_id, query = _support_and_query(team_pipeline)
    common = ["--support", str(support), str(label), "--class-id", str(class_id), "--query", str(query),
              "--out", str(tmp_path / "out")]  # fmt: skip
    wrong = _segment(["--model", "models:/simprop-canet@fold3", "--tracking-uri", team_server.url, *common], tmp_path)
    assert wrong.returncode == 2
    assert "no alias 'fold3'" in wrong.stderr and "fold0, fold0-seed0" in wrong.stderr and "Traceback" not in wrong.stderr
    unknown = _segment(["--model", "models:/simprop-dpr@fold0", "--tracking-uri", team_server.url, *common], tmp_path)
    assert unknown.returncode == 2 and "no registered model 'simprop-dpr'" in unknown.stderr
    assert "simprop-canet" in unknown.stderr  # it lists the ones there
    from mlflow_server import free_port

    away = f"http://127.0.0.1:{free_port()}"
    gone = _segment(["--model", "models:/simprop-canet@fold0", "--tracking-uri", away, *common], tmp_path)
    assert gone.returncode == 2 and f"no MLflow server answers at {away}" in gone.stderr
    assert not (tmp_path / "out").exists()  # nothing written


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on the sentinel: code a crafted checkpoint would run."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_segment_refuses_a_registered_checkpoint_holding_pickled_code(team_pipeline, team_server, tmp_path):  # noqa: F811
    """A version registered by hand (not by simprop) whose best.pt is a plain pickle that runs code:
    refused, and nothing in it runs - the registry is read through the same safe loader."""
    client = _client(team_server)
    experiment = client.get_experiment_by_name("simprop").experiment_id
    sentinel = tmp_path / "code-ran"
    folder = tmp_path / "evil"
    (folder / "artifacts").mkdir(parents=True)
    with open(folder / "artifacts" / "best.pt", "wb") as fh:
        pickle.dump({"format": "simprop-checkpoint", "x": _RunsCode(sentinel)}, fh)
    (folder / "MLmodel").write_text(yaml.safe_dump({"metadata": {"simprop_identity": {"variant": "canet", "fold": 0}}}))
    logged = client.create_logged_model(experiment, name="model")
    client.log_model_artifacts(logged.model_id, str(folder))
    client.create_registered_model("evil")
    client.create_model_version("evil", source=logged.artifact_location, model_id=logged.model_id,
                                tags={"checkpoint_sha256": _sha256(folder / "artifacts" / "best.pt")})  # fmt: skip
    support, label, class_id, query = _support_and_query(team_pipeline)
    result = _segment(["--model", "models:/evil/1", "--tracking-uri", team_server.url, "--support", str(support),
                       str(label), "--class-id", str(class_id), "--query", str(query), "--out", str(tmp_path / "out")],
                      tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not a safe checkpoint" in result.stderr and "Nothing in it was run" in result.stderr
    assert "models:/evil/1 (version 1)" in result.stderr
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_registration_is_off_for_the_local_store_by_default_and_params_are_checked(tmp_path):
    from simprop.engine.registry import registration_enabled, version_aliases
    from simprop.params import ParamsError, params_from_dict

    assert registration_enabled("auto", "http://mlflow.example:5000")
    assert not registration_enabled("auto", "sqlite:////repo/mlflow.db")
    assert registration_enabled(True, "sqlite:////repo/mlflow.db") and not registration_enabled(False, "https://x")
    assert version_aliases(2, 1, first_seed=0) == ["fold2-seed1"]
    assert version_aliases(2, 0, first_seed=0) == ["fold2-seed0", "fold2"]
    raw = tiny_params()
    raw["tracking"]["register_models"] = "yes"
    with pytest.raises(ParamsError, match="tracking.register_models"):
        params_from_dict(raw)
    raw["tracking"].update(register_models=True, registered_model="simprop")
    with pytest.raises(ParamsError, match=r"tracking.registered_model.*\{variant\}"):
        params_from_dict(raw)
    raw["tracking"]["registered_model"] = "team-a-{variant}"
    assert params_from_dict(raw).tracking.registered_model == "team-a-{variant}"
