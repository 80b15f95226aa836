"""A real PostgreSQL server on 127.0.0.1 for tests (no mocks), and an ``mlflow server`` on it.

Use the fixtures from a test module (``tests/`` is on ``sys.path`` under pytest)::

    from postgres import postgres, team_server  # noqa: F401  (registers the fixtures)

    def test_x(team_server):
        team_server.url            # http://127.0.0.1:<port>, runs in PostgreSQL, artifacts proxied
        team_server.postgres.uri   # postgresql://simprop:<password>@127.0.0.1:<port>/mlflow

PostgreSQL refuses to run as root, so ``initdb`` / ``pg_ctl`` run as the ``postgres`` user
(``runuser -u postgres --``) when the tests run as root, in a temporary folder that user owns
(under ``/tmp``: pytest's own temporary folders are private to root).  The server listens on
127.0.0.1 only, on a free port, with its unix socket in that folder; the superuser ``postgres``
has a password (scram-sha-256 over TCP) and ``createdb`` makes the database.  Every step is
bounded in time and the server is stopped (``pg_ctl stop -m fast``, then SIGKILL) and its folder
removed at teardown.  Binaries: the Debian package's ``/usr/lib/postgresql/<version>/bin``, else
``$PATH``; a missing one skips the tests, naming it (CI installs the package: .ci/run).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, free_port, start_server, stop_server

STEP_TIMEOUT_S = 120
PASSWORD = "simprop-test-password"
DATABASE = "mlflow"


def postgres_bin(name: str) -> str | None:
    """The newest Debian-packaged ``name`` (``/usr/lib/postgresql/<v>/bin``), else the one on ``$PATH``."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return found[-1] if found else shutil.which(name)


@dataclass
class Postgres:
    root: Path  # owned by the postgres user: data/, sock/, server.log
    port: int
    bindir: Path
    as_user: list[str]  # ["runuser", "-u", "postgres", "--"] when root, else []

    @property
    def uri(self) -> str:
        """What ``mlflow server --backend-store-uri`` takes.  ``+psycopg2``: SQLAlchemy 2.1 reads a bare
        ``postgresql://`` as psycopg 3, which is not installed; psycopg2-binary is (simprop[cluster])."""
        return f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def run(self, *args: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
        env = dict(os.environ, PGPASSWORD=PASSWORD)
        result = subprocess.run([*self.as_user, *args], check=False, cwd=self.root, env=env, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{self.log()}")
        return result

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def start_postgres() -> Postgres:
    """initdb, start on 127.0.0.1:<free port>, createdb ``mlflow``; stopped again if any step fails."""
    missing = [name for name in ("initdb", "pg_ctl", "createdb") if postgres_bin(name) is None]
    if missing:
        pytest.skip(f"PostgreSQL binaries {', '.join(missing)} not found (Debian package postgresql: "
                    "apt-get install postgresql; .ci/run installs it)")  # fmt: skip
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("runuser not found: PostgreSQL refuses to run as root and must run as the postgres user")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no 'postgres' user (created by the Debian package postgresql): PostgreSQL refuses root")
        as_user = ["runuser", "-u", "postgres", "--"]
    bindir = Path(postgres_bin("initdb")).parent  # type: ignore[arg-type]
    root = Path(tempfile.mkdtemp(prefix="simprop-pg-", dir="/tmp"))
    (root / "sock").mkdir()
    pwfile = root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        for path in (root, root / "sock", pwfile):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    pg = Postgres(root, free_port(), bindir, as_user)
    try:
        pg.run(str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", f"--pwfile={pwfile}",
               "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {pg.port} -c unix_socket_directories={root / 'sock'} -c fsync=off"
        pg.run(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-o", options,
               "-w", "-t", "60", "start")  # fmt: skip
        pg.run(str(postgres_bin("createdb")), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", DATABASE)
    except BaseException:
        stop_postgres(pg)
        raise
    return pg


def stop_postgres(pg: Postgres) -> None:
    """``pg_ctl stop -m fast``; SIGKILL to the postmaster if it does not stop; the folder removed."""
    data = pg.root / "data"
    try:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                pg.run(str(pg.bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
            pidfile = data / "postmaster.pid"
            if pidfile.exists():  # still there: kill the postmaster this fixture started
                with contextlib.suppress(Exception):
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
    finally:
        shutil.rmtree(pg.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server with an empty database ``mlflow``, for the test module."""
    pg = start_postgres()
    try:
        yield pg
    finally:
        stop_postgres(pg)


@dataclass
class TeamServer:
    mlflow: MlflowServer
    postgres: Postgres

    @property
    def url(self) -> str:
        return self.mlflow.url

    @property
    def artifacts(self) -> Path:
        """Where the server keeps artifacts (``--artifacts-destination``): clients only reach it over HTTP."""
        return self.mlflow.root / "artifacts"


@pytest.fixture(scope="module")
def team_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    """``mlflow server --backend-store-uri postgresql://... --artifacts-destination <tmp>`` on 127.0.0.1."""
    server = start_server(tmp_path_factory.mktemp("team_server"), backend_store_uri=postgres.uri)
    try:
        yield TeamServer(server, postgres)
    finally:
        stop_server(server)
