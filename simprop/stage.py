"""What every DVC stage entry point shares: load params, run, turn known errors into messages.

A stage script is ``sys.exit(run_stage("train", body, argv))``: params are
validated before ``body`` does any work, and an expected failure (bad params,
missing or corrupt input, a diverged training) prints one clear line naming the
file or key and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from simprop.params import Params, ParamsError, load_params


def expected_errors() -> tuple[type[BaseException], ...]:
    from simprop.datasets import DataError
    from simprop.model import BackboneWeightsError, CheckpointError
    from simprop.training import TrainingDiverged

    return (ParamsError, DataError, CheckpointError, BackboneWeightsError, TrainingDiverged, FileNotFoundError)


def run_stage(name: str, body: Callable[[Params], int | None], params_path: str | Path = "params.yaml") -> int:
    try:
        params = load_params(params_path)
    except ParamsError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return body(params) or 0
    except expected_errors() as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
