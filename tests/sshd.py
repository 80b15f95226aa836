"""A real OpenSSH server (Debian's ``/usr/sbin/sshd``) on 127.0.0.1 for tests (no mocks).

::

    from sshd import start_sshd, stop_sshd

    server = start_sshd(tmp_path / "sshd")   # host key, client key, sshd_config, a free port
    try:
        server.port, server.user, server.client_key   # ssh://<user>@127.0.0.1:<port>/<path>
    finally:
        stop_sshd(server)

Everything lives in the given directory: a fresh ed25519 host key and client key
(``ssh-keygen``), ``authorized_keys`` holding the client key, the ``sshd_config`` and the pid
file. sshd runs in the foreground (``-D -e``: log to ``sshd.log``), listens on 127.0.0.1 only,
accepts only that key (no passwords, no PAM) and logs in the user running the tests (root in CI:
``PermitRootLogin prohibit-password``). Start and stop are bounded in time; the process group is
killed at the end whatever happened.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow_server import free_port  # tests/ is on sys.path under pytest

SSHD = "/usr/sbin/sshd"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def missing_binaries() -> list[str]:
    """What a test needs and this machine lacks (Debian: ``apt-get install openssh-server openssh-client``)."""
    missing = [] if os.access(SSHD, os.X_OK) else [SSHD]
    missing += [name for name in ("ssh-keygen",) if shutil.which(name) is None]
    return missing


@dataclass
class Sshd:
    port: int
    user: str
    client_key: Path  # private key; client_key.pub is in authorized_keys
    host_key: Path  # the server's private host key; host_key.pub is what a client should trust
    root: Path
    process: subprocess.Popen

    def log(self) -> str:
        path = self.root / "sshd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def url(self, path: Path | str) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}/{str(path).lstrip('/')}"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "simprop-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip


def _answers(port: int) -> bool:
    """True once sshd sends its identification string (``SSH-2.0-...``) on the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.settimeout(1.0)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def start_sshd(root: Path) -> Sshd:
    """Start sshd with everything under ``root``; return once it answers on its port (bounded)."""
    missing = missing_binaries()
    if missing:
        raise FileNotFoundError(f"sshd test server: {', '.join(missing)} not found (apt-get install openssh-server)")
    root.mkdir(parents=True, exist_ok=True)
    host_key, client_key = root / "ssh_host_ed25519_key", root / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    authorized = root / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    # sshd refuses to start without its privilege-separation directory (the Debian unit creates it)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"PidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"  # the temp directories are not owned/permissioned like a home
        "Subsystem sftp internal-sftp\n"  # what DVC speaks; in-process, no sftp-server binary needed
        "LogLevel VERBOSE\n"
    )
    with open(root / "sshd.log", "wb") as log:
        # -D: stay in the foreground (our child), -e: log to stderr (sshd.log)
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    server = Sshd(port=port, user=getpass.getuser(), client_key=client_key, host_key=host_key, root=root,
                  process=process)  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode} before answering:\n{server.log()}")
        if _answers(port):
            return server
        time.sleep(0.1)
    stop_sshd(server)
    raise TimeoutError(f"sshd did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s:\n{server.log()}")


def stop_sshd(server: Sshd) -> None:
    """Terminate sshd and the sessions it forked (its process group), then kill what is left."""
    proc = server.process
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:  # session children (sftp) that outlived the listener
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=STOP_TIMEOUT_S)
