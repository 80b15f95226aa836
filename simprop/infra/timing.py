"""Where a stage process spends its wall time (``benchmarks/bench_stages.py`` reads it).

Off unless ``SIMPROP_STAGE_TIMINGS`` names a file: then every stage process appends one JSON
line to it when it ends::

    {"stage": "train", "status": "ok", "process_start": ..., "enter": ..., "end": ...,
     "spans": {"imports": 2.1, "mlflow_import": 2.4, "mlflow_setup": 0.3, "mlflow_logging": 0.5}}

``process_start`` is when the kernel started the process (``/proc/self/stat``), ``enter`` when
:func:`simprop.infra.stage.run_stage` was called (after the interpreter, ``simprop.params`` and the
stage script were loaded), ``end`` when it returned.  ``spans`` are seconds inside
``enter..end`` spent in the named parts; the rest of ``end - enter`` is the stage's work.

The clock is process-wide instrumentation, like :mod:`logging`'s configuration: it changes
no behaviour, and a process that never calls :func:`record` writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

ENV_VAR = "SIMPROP_STAGE_TIMINGS"


def process_start_time() -> float:
    """Epoch seconds at which this process was started (Linux ``/proc``; else ``now``)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 (starttime), counted after the ")" of the name
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class StageClock:
    """Spans of one stage process (see the module docstring)."""

    def __init__(self) -> None:
        self.enter: float | None = None
        self.spans: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spans[name] += time.perf_counter() - started

    def record(self, stage: str, status: str) -> None:
        """Append this process' line to ``$SIMPROP_STAGE_TIMINGS`` (nothing when unset)."""
        target = os.environ.get(ENV_VAR)
        if not target:
            return
        line = {
            "stage": os.environ.get("DVC_STAGE") or stage,
            "status": status,
            "process_start": process_start_time(),
            "enter": self.enter,
            "end": time.time(),
            "spans": {k: round(v, 4) for k, v in self.spans.items()},
        }
        with open(target, "a") as fh:  # one short write per process: lines do not interleave
            fh.write(json.dumps(line) + "\n")


CLOCK = StageClock()
span = CLOCK.span
