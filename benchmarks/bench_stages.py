"""Where the time of a `dvc repro` goes: per stage, start-up/imports, work, MLflow and DVC.

Runs ``/usr/bin/time -v dvc repro -f`` (or the given targets) in a repository with
``SIMPROP_STAGE_TIMINGS`` set, so every stage process appends its timing line
(:mod:`simprop.infra.timing`), then splits the wall time:

* ``startup``: interpreter start to the stage's ``run_stage`` call (Python, ``simprop.params``,
  the stage script) plus the stage's own lazy imports (torch, the library) and ``import mlflow``;
* ``mlflow``: experiment and run set-up, params, metrics, artifacts, closing the run;
* ``work``: everything else inside the stage process;
* ``dvc``: the wall time outside every stage process (DVC's start, dependency checks,
  hashing and caching outputs, writing ``dvc.lock``).

Usage (quiet machine; it reruns every stage)::

    TQDM_DISABLE=1 python3 benchmarks/bench_stages.py                 # the whole default DAG
    python3 benchmarks/bench_stages.py --targets evaluate --out /tmp/stages.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

IMPORT_SPANS = ("imports", "mlflow_import")
MLFLOW_SPANS = ("mlflow_setup", "mlflow_logging", "mlflow_close")


def stage_kind(name: str) -> str:
    """``train@canet`` -> ``train@*``: the per-variant stages of the runs before 919b36c (one
    ``train`` / ``evaluate`` stage since) are summed per kind; other names are kept."""
    return name.split("@")[0] + "@*" if "@" in name else name


def breakdown(lines: list[dict]) -> list[dict]:
    rows = []
    for line in lines:
        spans = line.get("spans", {})
        total = line["end"] - line["process_start"]
        enter = line["enter"] if line.get("enter") is not None else line["process_start"]
        imports = sum(spans.get(k, 0.0) for k in IMPORT_SPANS)
        mlflow = sum(spans.get(k, 0.0) for k in MLFLOW_SPANS)
        startup = (enter - line["process_start"]) + imports
        rows.append({
            "stage": line["stage"], "status": line.get("status"), "total": total, "startup": startup,
            "mlflow": mlflow, "work": total - startup - mlflow, "start": line["process_start"], "end": line["end"],
        })  # fmt: skip
    return sorted(rows, key=lambda r: r["start"])


def summarise(rows: list[dict], wall: float) -> dict:
    kinds: dict[str, dict] = defaultdict(lambda: {"count": 0, "total": 0.0, "startup": 0.0, "mlflow": 0.0, "work": 0.0})
    for r in rows:
        k = kinds[stage_kind(r["stage"])]
        k["count"] += 1
        for key in ("total", "startup", "mlflow", "work"):
            k[key] += r[key]
    in_stages = sum(r["total"] for r in rows)
    totals = {key: sum(r[key] for r in rows) for key in ("startup", "mlflow", "work")}
    return {"wall_s": wall, "stages": len(rows), "in_stages_s": in_stages, "dvc_s": wall - in_stages, **{f"{k}_s": v for k, v in totals.items()},
            "by_kind": dict(kinds)}  # fmt: skip


def print_table(summary: dict) -> None:
    print(f"{'stage':28s} {'n':>3s} {'total s':>8s} {'startup':>8s} {'mlflow':>8s} {'work':>8s}")
    for kind, k in summary["by_kind"].items():
        print(f"{kind:28s} {k['count']:3d} {k['total']:8.1f} {k['startup']:8.1f} {k['mlflow']:8.1f} {k['work']:8.1f}")
    print(f"{'all stage processes':28s} {summary['stages']:3d} {summary['in_stages_s']:8.1f} {summary['startup_s']:8.1f} "
          f"{summary['mlflow_s']:8.1f} {summary['work_s']:8.1f}")  # fmt: skip
    print(f"{'dvc (outside the stages)':28s} {'':3s} {summary['dvc_s']:8.1f}")
    print(f"{'wall':28s} {'':3s} {summary['wall_s']:8.1f}   peak RSS {summary.get('peak_rss_mb', 0):.0f} MB")


def parse_time_v(stderr: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) from GNU time's ``-v`` report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    seconds = 0.0
    if wall:
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return seconds, (int(rss.group(1)) / 1024 if rss else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="the DVC repository (default: here)")
    parser.add_argument("--targets", nargs="*", default=[], help="dvc repro targets (default: everything)")
    parser.add_argument("--no-force", action="store_true", help="run only what is out of date")
    parser.add_argument("--out", help="write the rows and the summary as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.jsonl"
        env = {**os.environ, "SIMPROP_STAGE_TIMINGS": str(timings), "TQDM_DISABLE": "1",
               "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "dvc", "repro", *([] if args.no_force else ["-f"]), *args.targets]
        result = subprocess.run(cmd, cwd=args.repo, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
            return result.returncode
        lines = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    wall, rss = parse_time_v(result.stderr)
    rows = breakdown(lines)
    summary = summarise(rows, wall)
    summary["peak_rss_mb"] = rss
    print_table(summary)
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
