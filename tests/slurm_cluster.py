"""A real one-node SLURM cluster on 127.0.0.1 for the tests: ``munged``, ``slurmctld -D`` and ``slurmd -D``
from the Debian packages, every file (key, sockets, state, spool, logs) in a temporary folder.

Nothing is faked: ``sbatch`` / ``squeue`` / ``scancel`` talk to these daemons through ``SLURM_CONF``,
which :func:`start_cluster` sets in ``os.environ`` (and :func:`stop_cluster` removes), so that
submitit and every child process use this cluster.  No cgroups (``proctrack/linuxproc``,
``task/none``) and no accounting database: finished jobs are recorded by ``jobcomp/filetxt`` in
:attr:`Cluster.jobcomp`, one line per job (:func:`finished_jobs` parses it).

Follows the layout of Slurm's own minimal test configurations (``slurm.conf`` man page, "EXAMPLE")
and of the single-node ``slurm-docker-cluster`` set-ups; ``SlurmdParameters=config_overrides``
keeps the node from being drained when the CPUs declared differ from the hardware; ``cred_expire=10``
shortens the wait of a requeued job before it may start again (120 s by default), and
``bf_interval=1`` starts it within a second of that (the backfill scheduler's 30 s cycle by default).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_server import free_port  # tests/ is on sys.path under pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
START_TIMEOUT_S = 60.0


def missing_binaries() -> list[str]:
    """The daemons and clients this module needs that are not on this machine (``PATH`` and ``/usr/sbin``)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in BINARIES if shutil.which(name, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert found, name
    return found


@dataclass
class Cluster:
    folder: Path
    conf: Path
    jobcomp: Path
    partition: str
    cpus: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _conf(folder: Path, munge_socket: Path, cpus: int, memory_mb: int, partition: str) -> str:
    ctld, slurmd = free_port(), free_port()
    return f"""\
ClusterName=simproptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(cpus: int | None = None, partition: str = "debug") -> Cluster:
    """Start munged, slurmctld and slurmd; wait (bounded) until the node is idle.  ``SLURM_CONF`` is set
    in ``os.environ``.  On any failure everything started is stopped and the daemons' logs are raised."""
    folder = Path(tempfile.mkdtemp(prefix="slurm-"))
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(mode=0o700)
    cpus = cpus or os.cpu_count() or 1
    memory_mb = max(512, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 1024)
    key, munge_socket = folder / "munge" / "munge.key", folder / "munge" / "munge.socket"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = folder / "slurm.conf"
    conf.write_text(_conf(folder, munge_socket, cpus, memory_mb, partition))
    cluster = Cluster(folder, conf, folder / "jobcomp.txt", partition, cpus)
    env = cluster.env
    try:
        _spawn(cluster, "munged", [
            "-F", "-f", f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={folder / 'munge' / 'munged.pid'}",
            f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munge' / 'munged.seed'}",
        ])  # fmt: skip
        _wait(lambda: munge_socket.exists(), "munged did not create its socket", cluster)
        _spawn(cluster, "slurmctld", ["-D", "-i", "-f", str(conf)])
        _spawn(cluster, "slurmd", ["-D", "-N", "localhost", "-f", str(conf)])
        _wait(lambda: _node_idle(env), "the node did not become idle (sinfo)", cluster)
    except BaseException:
        stop_cluster(cluster)
        raise
    os.environ["SLURM_CONF"] = str(conf)
    return cluster


def _spawn(cluster: Cluster, name: str, args: list[str]) -> None:
    """Start daemon ``name`` in the foreground, its stderr in ``<folder>/<name>.err``."""
    with open(cluster.folder / f"{name}.err", "wb") as err:
        cluster.processes[name] = subprocess.Popen([_which(name), *args], stdout=subprocess.DEVNULL, stderr=err,
                                                   env=cluster.env)  # fmt: skip


def _node_idle(env: dict[str, str]) -> bool:
    result = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%T"], check=False, env=env, capture_output=True, text=True,
                            timeout=10)  # fmt: skip
    return result.returncode == 0 and result.stdout.strip() == "idle"


def _wait(ready, what: str, cluster: Cluster, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting:\n{_logs(cluster)}")
        try:
            if ready():
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} within {timeout:.0f} s:\n{_logs(cluster)}")


def _logs(cluster: Cluster) -> str:
    parts = []
    for name in ("munged", "munged.err", "slurmctld", "slurmctld.err", "slurmd", "slurmd.err"):
        path = cluster.folder / (name if name.endswith(".err") else f"{name}.log")
        if path.exists():
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def queued_jobs(cluster: Cluster) -> list[str]:
    """Ids of the jobs (array tasks too) ``squeue`` still lists."""
    result = subprocess.run([_which("squeue"), "-h", "-o", "%i %T"], check=False, env=cluster.env, capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _fields(text: str) -> dict[str, str]:
    """The ``Key=value`` words of a SLURM record (a jobcomp line, ``scontrol show job``)."""
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def finished_jobs(cluster: Cluster) -> list[dict[str, str]]:
    """The ``jobcomp/filetxt`` records: one dict per finished job (``JobId``, ``JobState``, ``NodeList``, ...)."""
    if not cluster.jobcomp.exists():
        return []
    return [record for record in map(_fields, cluster.jobcomp.read_text().splitlines()) if record]


def job_record(cluster: Cluster, job_id: str) -> dict[str, str]:
    """slurmctld's record of a job (``JobState``, ``Restarts``, ...), kept ``MinJobAge`` s after it ends."""
    result = subprocess.run([_which("scontrol"), "show", "job", job_id], check=False, env=cluster.env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return _fields(result.stdout)


def stop_cluster(cluster: Cluster) -> None:
    """``scancel`` what is left, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL after 15 s)."""
    if cluster.processes.get("slurmctld") and cluster.processes["slurmctld"].poll() is None:
        try:
            subprocess.run([_which("scancel"), "--full", "--user", str(os.getuid())], check=False, env=cluster.env,
                           capture_output=True, timeout=30)  # fmt: skip
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and queued_jobs(cluster):
                time.sleep(0.5)
        except (subprocess.TimeoutExpired, AssertionError):
            pass
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.processes.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    if os.environ.get("SLURM_CONF") == str(cluster.conf):
        del os.environ["SLURM_CONF"]
