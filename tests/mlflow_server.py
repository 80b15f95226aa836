"""A real ``mlflow server`` on 127.0.0.1 for tests (no mocks).

Use the session fixture from a test module (``tests/`` is on ``sys.path`` under pytest)::

    from mlflow_server import mlflow_server  # noqa: F401  (registers the fixture)

    @pytest.mark.slow
    def test_something(mlflow_server):
        mlflow_server.url        # "http://127.0.0.1:<port>"
        mlflow_server.get("/api/2.0/mlflow/experiments/search", max_results=10)

The server stores runs in ``sqlite:///<tmp>/mlflow.db`` and proxies artifacts to
``<tmp>/artifacts``; it starts in about 8 s and is killed at the end of the session.

Creating a fresh sqlite store costs 5-8 s of schema migrations.  Tests that need a store of
their own copy an already migrated empty one instead::

    from mlflow_server import mlflow_db_template, copy_store  # noqa: F401

    def test_x(tmp_path, mlflow_db_template):
        copy_store(mlflow_db_template, tmp_path)   # tmp_path/mlflow.db, ready in milliseconds
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    url: str
    root: Path  # holds mlflow.db, artifacts/ and server.log
    process: subprocess.Popen

    def get(self, endpoint: str, **query: Any) -> dict:
        resp = requests.get(self.url + endpoint, params=query, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def post(self, endpoint: str, body: dict) -> dict:
        resp = requests.post(self.url + endpoint, json=body, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def start_server(root: Path, port: int | None = None, db: Path | None = None,
                 backend_store_uri: str | None = None) -> MlflowServer:  # fmt: skip
    """Start ``mlflow server`` in ``root`` and wait until ``/health`` answers.

    ``db``: an existing sqlite store to browse (default ``root/mlflow.db``), e.g. the one a
    real ``dvc repro`` wrote at a repository root.  ``backend_store_uri``: another store instead
    (e.g. ``postgresql://...``: tests/postgres.py).
    """
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{db or root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log = open(root / "server.log", "wb")
    process = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    server = MlflowServer(f"http://127.0.0.1:{port}", root, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{server.log()}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"mlflow server did not answer /health in {START_TIMEOUT_S} s:\n{server.log()}")


def stop_server(server: MlflowServer) -> None:
    """Terminate the server's process group (it forks workers), then kill if needed."""
    if server.process.poll() is not None:
        return
    pgid = os.getpgid(server.process.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        server.process.wait(timeout=15)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running tracking server for the whole test session, killed at teardown."""
    server = start_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow sqlite store, created once per session."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def copy_store(template: Path, directory: Path, name: str = "mlflow.db") -> str:
    """Copy the template store to ``directory/name``; return its ``sqlite:///`` URI."""
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / name
    shutil.copyfile(template, dest)
    return f"sqlite:///{dest}"
