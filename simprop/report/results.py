"""The report's required inputs: the metrics files of every ``(variant, fold, training seed)`` in params.

For every replicate in ``params.train.variants`` x ``params.train.folds`` x ``params.train.seeds``
-- the lists from params, never a glob, so a stale file from a run that has since been dropped
from params cannot leak into a table -- the report reads (file contracts in
docs/architecture.md, paths from :class:`~simprop.layout.RunLayout`):

* ``metrics/evaluate/<variant>/fold<i>/seed<s>.json`` (required),
* ``metrics/train/<variant>/fold<i>/seed<s>.json`` (required).

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
    """What the report knows about one trained and evaluated (variant, fold, training seed)."""

    variant: str
    fold: int
    seed: int
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


def load_results(params: Params, root: str | Path = ".") -> dict[tuple[str, int, int], RunResult]:
    """Read the metrics of every (variant, fold, training seed) in the params lists, keyed so;
    fail naming a missing file."""
    root = Path(root)
    results = {}
    for variant in params.train.variants:
        for fold in params.train.folds:
            for seed in params.train.seeds:
                layout = RunLayout(root, variant, fold, seed)
                what = f"{variant} fold {fold} training seed {seed}"
                ev = _read_json(
                    layout.evaluate_metrics,
                    f"evaluate metrics of {what}",
                    f"run the evaluate stage: `dvc repro evaluate` "
                    f"(or `python stages/evaluate.py --variant {variant} --fold {fold}`)",
                )
                _check_fresh(ev, layout.evaluate_metrics, params, variant, fold, seed)
                tr = _read_json(
                    layout.train_metrics,
                    f"training metrics of {what}",
                    f"run the train stage: `dvc repro train` "
                    f"(or `python stages/train.py --variant {variant} --fold {fold}`)",
                )
                results[(variant, fold, seed)] = RunResult(variant, fold, seed, ev, tr)
    return results


def _check_fresh(record: dict, path: Path, params: Params, variant: str, fold: int, seed: int) -> None:
    expected = {
        "variant": variant,
        "fold": fold,
        "train_seed": seed,
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
