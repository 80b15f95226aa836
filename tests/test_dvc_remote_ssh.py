"""A team's DVC remote over SSH, end to end on a real sshd (issue 27, part 3; docs/scale-out.md).

Nothing is mocked: Debian's ``/usr/sbin/sshd`` runs on 127.0.0.1 with a fresh host key and a
fresh client key (tests/sshd.py), the DVC remote is ``ssh://<user>@127.0.0.1:<port>/<temp dir>``
(dvc-ssh), git's remote is a bare repository in a temp dir. Engineer A runs a tiny pipeline
(1 variant x 1 fold x 1 training seed), commits and ``dvc push``es; engineer B clones, sets
only the key in ``.dvc/config.local`` and ``dvc pull``s: nothing is left to run. Then A runs an
experiment, ``dvc exp push``es it, B ``dvc exp pull``s, shows and applies it.

Every DVC command that talks to the remote runs with an empty ``HOME`` and no ssh agent, so the
only credential is the ``keyfile`` set with ``dvc remote modify --local`` (and no ~/.ssh of the
machine can make the test pass or fail).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from sshd import missing_binaries, start_sshd, stop_sshd  # tests/ is on sys.path under pytest
from test_pipeline import DVC, git_env, make_repo, run, tiny_params

pytestmark = pytest.mark.slow

VARIANT, FOLD, SEED = "canet", 0, 0
REMOTE = "team"
EXPERIMENT = "team-lr"
EXP_LR = 0.02  # the experiment's train.lr (the tiny params train at 0.01)
TIMEOUT = 300  # any one push / pull / clone on loopback


def small_params() -> dict:
    """tests/test_pipeline.py's tiny params cut to 1 variant x 1 fold x 1 seed (dvc repro ~1 min on 2 cores)."""
    params = tiny_params()
    params["splits"]["folds"] = [FOLD]
    params["train"].update(variants=[VARIANT], folds=[FOLD], seeds=[SEED])
    params["analysis"].update(variant=VARIANT, fold=FOLD)
    return params


def remote_env(home: Path) -> dict[str, str]:
    """The environment of a DVC command that talks to the remote: an empty HOME (no ~/.ssh keys,
    config or known_hosts) and no agent, so only the configured keyfile can log in."""
    env = git_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SSH_AUTH_SOCK", None)
    env["HOME"] = str(home)
    return env


def remote_run(cmd: list[str], repo: Path, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = remote_env(home)
    env["PYTHONPATH"] = str(repo)
    # stdin from /dev/null: a missing key fails instead of waiting at a passphrase or password prompt
    result = subprocess.run(
        cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def timed(fn, *args, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cached_outputs(repo: Path) -> dict[str, tuple[str, bool]]:
    """Every output DVC caches (so pushes), ``path -> (md5, persist)``, and the ``cache: false`` ones
    as ``path -> ("", False)`` under the key ``"!" + path``; read through DVC's own index."""
    from dvc.repo import Repo

    found = {}
    with Repo(str(repo)) as dvc_repo:
        for out in dvc_repo.index.outs:
            path = Path(out.fs_path).relative_to(repo).as_posix()
            if out.use_cache:
                found[path] = (out.hash_info.value, bool(out.persist))
            else:
                found["!" + path] = ("", False)
    return found


def remote_object(remote: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object in a remote (and a cache): files/md5/<2 hex>/<rest>."""
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: apt-get install openssh-server openssh-client)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        stop_sshd(server)


@pytest.fixture(scope="module")
def team(sshd_server, tmp_path_factory):
    """A's repo run, committed and pushed to git (a bare repo) and to the DVC remote over SSH."""
    base = tmp_path_factory.mktemp("team")
    home = base / "home"  # the empty HOME of every remote command
    home.mkdir()
    storage = base / "storage"  # the remote's directory, reached only through sshd
    storage.mkdir()
    origin = base / "origin.git"
    a = make_repo(base / "a")
    (a / "params.yaml").write_text(yaml.safe_dump(small_params(), sort_keys=False))
    # what `ruff check` run in a code folder leaves there: a cache git ignores (its own `*` .gitignore),
    # so no clone has it; a code dependency must not hash it (.dvcignore), or B's clone reruns train
    lint_cache = a / "simprop" / "infra" / ".ruff_cache"
    lint_cache.mkdir(exist_ok=True)
    (lint_cache / ".gitignore").write_text("# Automatically created by ruff.\n*\n")
    (lint_cache / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    start = time.monotonic()
    run([*DVC, "repro"], a, timeout=900)
    repro_s = time.monotonic() - start
    url = sshd_server.url(storage)
    run([*DVC, "remote", "add", "-d", REMOTE, url], a)  # shared: lands in .dvc/config, in git
    run([*DVC, "remote", "modify", "--local", REMOTE, "keyfile", str(sshd_server.client_key)], a)  # private
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "tiny run + team remote"], a)
    branch = run(["git", "symbolic-ref", "--short", "HEAD"], a).stdout.strip()
    run(["git", "init", "-q", "--bare", str(origin)], base)
    run(["git", "remote", "add", "origin", str(origin)], a)
    run(["git", "push", "-q", "origin", f"HEAD:refs/heads/{branch}"], a)
    push, push_s = timed(remote_run, [*DVC, "push"], a, home)
    return {
        "a": a, "home": home, "storage": storage, "origin": origin, "branch": branch, "url": url,
        "server": sshd_server, "push": push,
        "measured": {"repro_s": repro_s, "push_s": push_s, "remote_bytes": tree_bytes(storage),
                     "remote_files": sum(1 for p in storage.rglob("*") if p.is_file()),
                     "cache_bytes": tree_bytes(a / ".dvc" / "cache")},
    }  # fmt: skip


@pytest.fixture(scope="module")
def clone(team):
    """B's fresh clone: git clone, only the keyfile set (locally), dvc pull."""
    b = team["a"].parent / "b"
    run(["git", "clone", "-q", "--branch", team["branch"], str(team["origin"]), str(b)], team["a"].parent)
    # without the key nothing comes through: no ~/.ssh, no agent, and git carries no secret
    refused = remote_run([*DVC, "pull"], b, team["home"], check=False)
    run([*DVC, "remote", "modify", "--local", REMOTE, "keyfile", str(team["server"].client_key)], b)
    pull, pull_s = timed(remote_run, [*DVC, "pull"], b, team["home"])
    team["measured"]["pull_s"] = pull_s
    return {"b": b, "refused": refused, "pull": pull}


@pytest.fixture(scope="module")
def experiment(team, clone):
    """A runs an experiment and pushes it; B pulls it."""
    a, b, home = team["a"], clone["b"], team["home"]
    start = time.monotonic()
    run([*DVC, "exp", "run", "-n", EXPERIMENT, "-S", f"train.lr={EXP_LR}"], a, timeout=900)
    team["measured"]["exp_run_s"] = time.monotonic() - start
    a_metrics = (a / "metrics" / "evaluate" / VARIANT / f"fold{FOLD}" / f"seed{SEED}.json").read_text()
    a_model = file_md5(a / "models" / VARIANT / f"fold{FOLD}" / f"seed{SEED}" / "best.pt")
    _, team["measured"]["exp_push_s"] = timed(remote_run, [*DVC, "exp", "push", "origin", EXPERIMENT], a, home)
    _, team["measured"]["exp_pull_s"] = timed(remote_run, [*DVC, "exp", "pull", "origin", EXPERIMENT], b, home)
    return {"a_metrics": json.loads(a_metrics), "a_model": a_model}


def test_push_sends_every_cached_output_and_no_secret_to_git(team):
    a, storage = team["a"], team["storage"]
    outs = cached_outputs(a)
    cached = {p: v for p, v in outs.items() if not p.startswith("!")}
    # what the team shares through the remote: data, features, backbone, models, evaluation outputs, reports
    for expected in ("data/raw", "data/features", "data/episodes", "backbone/resnet50.pt", "models",
                     "outputs/evaluate", "reports/tables.md"):  # fmt: skip
        assert expected in cached, f"{expected} is not a cached output: {sorted(cached)}"
    assert cached["models"][1], "models/ is persisted (a finished training is not redone)"
    checked = 0
    for path, (md5, _) in cached.items():
        obj = remote_object(storage, md5)
        assert obj.is_file(), f"{path}: object {md5} is not in the remote"
        checked += 1
        if md5.endswith(".dir"):  # a directory output: its listing and every file in it
            for entry in json.loads(obj.read_text()):
                assert remote_object(storage, entry["md5"]).is_file(), f"{path}/{entry['relpath']} not pushed"
                checked += 1
    assert checked > len(cached)
    # and DVC agrees: nothing left to push
    status = remote_run([*DVC, "status", "--cloud", "--json"], a, team["home"])
    assert json.loads(status.stdout or "{}") == {}, status.stdout
    # DVC never checked sshd's host key: the push succeeded with no known_hosts at all and wrote none
    assert not (team["home"] / ".ssh").exists()
    # cache: false outputs (metrics, training curves) travel in git, not through the remote
    uncached = sorted(p[1:] for p in outs if p.startswith("!"))
    assert "metrics/train" in uncached and "plots/train/loss" in uncached
    tracked = set(run(["git", "ls-files"], a).stdout.split())
    for path in uncached:
        assert any(t == path or t.startswith(path + "/") for t in tracked), f"{path} (cache: false) is not in git"
    # the MLflow store is machine-local: neither a DVC output nor in git
    assert (a / "mlflow.db").is_file()
    assert "mlflow.db" not in tracked and not any(p in ("mlflow.db", "mlruns", "mlartifacts") for p in cached)
    # the remote's URL is shared, the key path is not
    shared = (a / ".dvc" / "config").read_text()
    assert team["url"] in shared and "keyfile" not in shared
    assert "keyfile" in (a / ".dvc" / "config.local").read_text()
    assert ".dvc/config.local" not in tracked
    run(["git", "check-ignore", "-q", ".dvc/config.local"], a)


def test_a_fresh_clone_pulls_everything_and_has_nothing_to_run(team, clone):
    a, b = team["a"], clone["b"]
    refused = clone["refused"]
    assert refused.returncode != 0, "dvc pull without the key must fail"
    assert "keyfile" not in (b / ".dvc" / "config").read_text()
    status = json.loads(run([*DVC, "status", "--json"], b).stdout or "{}")
    assert status == {}, status
    repro = run([*DVC, "repro"], b, timeout=300)
    assert "Running stage" not in repro.stdout, repro.stdout[-3000:]
    assert "didn't change, skipping" in repro.stdout or "Data and pipelines are up to date" in repro.stdout
    # the pulled outputs are A's bytes
    for rel in (f"models/{VARIANT}/fold{FOLD}/seed{SEED}/best.pt", "backbone/resnet50.pt", "reports/tables.md"):
        assert file_md5(b / rel) == file_md5(a / rel), rel
    assert not (b / "mlflow.db").exists(), "MLflow's store is not shared through git or DVC"


def test_an_experiment_travels_through_git_and_the_remote(team, clone, experiment):
    b = clone["b"]
    listed = run([*DVC, "exp", "list", "--name-only"], b).stdout.split()
    assert EXPERIMENT in listed, listed
    shown = json.loads(run([*DVC, "exp", "show", "--json"], b).stdout)
    record = _find_experiment(shown, EXPERIMENT)
    assert record is not None, f"{EXPERIMENT} not in dvc exp show: {json.dumps(shown)[:3000]}"
    data = record["data"]
    params = data["params"]["params.yaml"]["data"]
    assert params["train"]["lr"] == EXP_LR
    metrics_key = f"metrics/evaluate/{VARIANT}/fold{FOLD}/seed{SEED}.json"
    # DVC shows a metrics file's scalars (lists and nulls left out): every one is A's
    shown_metrics = _scalars(data["metrics"][metrics_key]["data"])
    assert "shot1.miou_mean" in shown_metrics and shown_metrics == _scalars(experiment["a_metrics"])
    # apply it: the params, metrics and (from the DVC remote) the model are A's experiment's
    run([*DVC, "exp", "apply", EXPERIMENT], b)
    assert yaml.safe_load((b / "params.yaml").read_text())["train"]["lr"] == EXP_LR
    assert json.loads((b / metrics_key).read_text()) == experiment["a_metrics"]
    model = b / "models" / VARIANT / f"fold{FOLD}" / f"seed{SEED}" / "best.pt"
    assert file_md5(model) == experiment["a_model"]
    status = json.loads(run([*DVC, "status", "--json"], b).stdout or "{}")
    assert status == {}, status
    measured = team["measured"]
    print("\nDVC remote over SSH, measured:", json.dumps({k: round(v, 2) for k, v in measured.items()}))


def _scalars(record: dict, prefix: str = "") -> dict:
    """The scalar leaves of a metrics record, ``{"a.b.c": value}`` (what ``dvc exp show`` shows of it)."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_scalars(value, name))
        elif isinstance(value, (str, int, float)):
            out[name] = value
    return out


def _find_experiment(node, name: str):
    """The record of experiment ``name`` anywhere in ``dvc exp show --json`` output."""
    if isinstance(node, dict):
        if node.get("name") == name and "data" in node:
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_experiment(child, name)
        if found is not None:
            return found
    return None
