"""The report's required inputs: the metrics files of every ``(variant, fold)`` in params.

For every ``(variant, fold)`` in ``params.train.variants`` x ``params.train.folds`` -- the lists
from params, never a glob, so a stale file from a run that has since been dropped from params
cannot leak into a table -- the report reads (file contracts in docs/architecture.md, paths from
:class:`~simprop.layout.RunLayout`):

* ``metrics/evaluate/<variant>/fold<i>.json`` (required),
* ``metrics/train/<variant>/fold<i>.json`` (required).

A missing or unreadable file raises :class:`MissingInputError` naming the file and the stage that
writes it; an evaluate file written under other params raises :class:`StaleInputError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simprop.layout import RunLayout
from simprop.params import Params


class MissingInputError(FileNotFoundError):
    """A metrics file the report needs does not exist; the message names it and the stage to run."""


class StaleInputError(ValueError):
    """A metrics file was produced under other params (protocol, episodes, seeds, resolution)."""


@dataclass
class RunResult:
    """What the report knows about one trained and evaluated (variant, fold)."""

    variant: str
    fold: int
    evaluate: dict[str, Any]
    train: dict[str, Any]

    def shot(self, shots: int) -> dict[str, Any] | None:
        return self.evaluate.get(f"shot{shots}")


def _read_json(path: Path, what: str, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInputError(f"{path}: {what} is missing; {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MissingInputError(f"{path}: not valid JSON ({exc}); {hint}") from exc


def load_results(params: Params, root: str | Path = ".") -> dict[tuple[str, int], RunResult]:
    """Read the metrics of every (variant, fold) in the params lists; fail naming a missing file."""
    root = Path(root)
    results = {}
    for variant in params.train.variants:
        for fold in params.train.folds:
            ev_path = RunLayout(root, variant, fold).evaluate_metrics
            ev = _read_json(
                ev_path,
                f"evaluate metrics of {variant} fold {fold}",
                f"run the evaluate stage: `dvc repro evaluate` "
                f"(or `python stages/evaluate.py --variant {variant} --fold {fold}`)",
            )
            _check_fresh(ev, ev_path, params, variant, fold)
            tr = _read_json(
                RunLayout(root, variant, fold).train_metrics,
                f"training metrics of {variant} fold {fold}",
                f"run the train stage: `dvc repro train` "
                f"(or `python stages/train.py --variant {variant} --fold {fold}`)",
            )
            results[(variant, fold)] = RunResult(variant, fold, ev, tr)
    return results


def _check_fresh(record: dict, path: Path, params: Params, variant: str, fold: int) -> None:
    expected = {
        "variant": variant,
        "fold": fold,
        "protocol": params.splits.protocol,
        "episodes": params.episodes.num_episodes,
        "seeds": list(params.episodes.test_seeds),
        "resolution": params.evaluate.resolution,
        "void": params.evaluate.void,
        "class_sampling": params.episodes.class_sampling,
    }
    for key, want in expected.items():
        if key in record and record[key] != want:
            raise StaleInputError(
                f"{path}: {key} is {record[key]!r} but params say {want!r}; the file is stale, "
                f"rerun `dvc repro evaluate`"
            )
