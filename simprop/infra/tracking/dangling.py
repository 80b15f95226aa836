"""No dangling runs: a run whose process was SIGKILLed is closed by the next run of its stage.

A process killed with SIGKILL cannot close its run; the next run of the same stage key
(``stage_key`` tag: run name, DVC experiment and repository) closes every RUNNING run of that
key whose process is gone as KILLED, tagged ``replaced_by_run``; the new run is tagged
``replaces_run``.  A run whose process (``process`` tag: host, pid and start time) is still
alive is left alone.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or ``""``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 (starttime), after the command name


def process_token(pid: int | None = None) -> str:
    """``host:pid:start``: names this process so that a later run can tell whether it still lives."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def process_alive(token: str) -> bool:
    """Whether the process a :func:`process_token` names still runs (on another host: assume so)."""
    try:
        host, pid_text, start = token.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # cannot tell; never close another machine's run
    if start:
        return _process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stage_key(name: str, repo_root: Path) -> str:
    """What makes two runs "the same stage": run name, DVC experiment, repository."""
    return f"{name}|{os.environ.get('DVC_EXP_NAME') or 'workspace'}|{repo_root}"


def close_dangling_runs(client: "MlflowClient", experiment_id: str, key: str, replaced_by: str) -> list[str]:
    """Close as KILLED every RUNNING run of stage key ``key`` whose process is gone.

    Each gets the tags ``replaced_by_run`` (``replaced_by``) and ``killed_reason``; returns their ids.
    """
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    closed = []
    for run in runs:
        if run.data.tags.get("stage_key") != key or run.info.run_id == replaced_by:
            continue
        if process_alive(run.data.tags.get("process", "")):
            continue
        client.set_tag(run.info.run_id, "replaced_by_run", replaced_by)
        client.set_tag(
            run.info.run_id, "killed_reason",
            "its process ended without closing the run (SIGKILL, power loss); found RUNNING when the stage started again",
        )  # fmt: skip
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed
