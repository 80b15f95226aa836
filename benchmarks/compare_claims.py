"""Two or more runs' claims side by side: do they reach the same conclusions?

Reads each run's ``metrics/report.json`` (the report stage's summary: per-variant means and the
verdict on each of the paper's claims, :mod:`simprop.report.claims`) and prints, as markdown, the
per-variant mean 1-shot mIoU (± std over training seeds) of each run and each claim's mean
difference, 95 % interval and verdict per run.  Exits 1 when a claim is "supported" in one run and
"contradicted" in another (the runs disagree), else 0: run it on your own rerun of the committed
pipeline (another CPU, thread count or library version moves every number) against the committed
``metrics/report.json``.

Usage: ``python3 benchmarks/compare_claims.py committed/metrics/report.json mine/metrics/report.json
[--names committed mine] [--out claims.md]``; a ``git:<rev>`` argument reads the file at that
revision (``git:HEAD``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VERDICTS = {1: "supported", 0: "undecided", -1: "contradicted", None: "not run"}


def read_summary(source: str) -> dict:
    if source.startswith("git:"):
        shown = subprocess.run(["git", "show", f"{source[4:]}:metrics/report.json"], capture_output=True, text=True)
        if shown.returncode:
            raise SystemExit(f"{source}: {shown.stderr.strip()}")
        return json.loads(shown.stdout)
    path = Path(source)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; give a report stage's metrics/report.json")
    return json.loads(path.read_text())


def _num(value: float | None, signed: bool = False) -> str:
    return "—" if value is None else (f"{value:+.2f}" if signed else f"{value:.2f}")


def compare(summaries: dict[str, dict]) -> tuple[str, list[str]]:
    """The markdown comparison and the claims on which the runs contradict each other."""
    names = list(summaries)
    variants = [v for v in ("canet", "dpr", "fbaf", "dpr_fbaf", "simpropnet") if any(v in s for s in summaries.values())]
    lines = ["| variant | " + " | ".join(f"{n}: 1-shot mIoU ± seeds" for n in names) + " |",
             "|---|" + "---|" * len(names)]  # fmt: skip
    for v in variants:
        cells = []
        for n in names:
            entry = summaries[n].get(v, {})
            std = entry.get("shot1_miou_std")
            cells.append(_num(entry.get("shot1_miou")) + (f" ± {std:.2f}" if std is not None else ""))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s.get("claims", {})))
    lines += ["", "| claim | " + " | ".join(f"{n}: mean [95 % interval] verdict" for n in names) + " |",
              "|---|" + "---|" * len(names)]  # fmt: skip
    disagree = []
    for key in keys:
        cells, verdicts = [], set()
        for n in names:
            c = summaries[n].get("claims", {}).get(key)
            if c is None:
                cells.append("—")
                continue
            verdict = VERDICTS.get(c.get("verdict"))
            verdicts.add(verdict)
            interval = f" [{_num(c.get('low'), True)}, {_num(c.get('high'), True)}]" if c.get("low") is not None else ""
            cells.append(f"{_num(c.get('mean'), True)}{interval} {verdict}")
        if {"supported", "contradicted"} <= verdicts:
            disagree.append(key)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Claims supported in one run and contradicted in another: {', '.join(disagree) or 'none'}.")
    return "\n".join(lines) + "\n", disagree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="metrics/report.json files (or git:<rev>)")
    parser.add_argument("--names", nargs="+", help="a column name per report")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    names = args.names or args.reports
    if len(names) != len(args.reports):
        parser.error("--names: give one name per report")
    text, disagree = compare({n: read_summary(r) for n, r in zip(names, args.reports)})
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
