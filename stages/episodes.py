"""DVC stage `episodes`: fixed, seeded test and validation episode files per fold."""

from __future__ import annotations

import sys

from simprop.data.episodes import build_episodes
from simprop.data.layout import DataLayout
from simprop.infra.stage import run_stage, stage_args
from simprop.infra.tracking import stage_run
from simprop.params import Params


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv)

    def body(params: Params) -> int:
        layout = DataLayout(params.data.root)
        with stage_run("episodes", params) as run:
            written = build_episodes(layout, params.splits.folds, params.episodes)
            run.log_metrics({"test_files": written["test_files"], "val_files": written["val_files"]})
        e = params.episodes
        print(f"episodes: class sampling {e.class_sampling}, {written['test_files']} test files ({e.num_episodes} episodes, seeds {list(e.test_seeds)}) "
              f"and {written['val_files']} validation files ({e.num_val_episodes} episodes, seed {e.val_seed}) "
              f"in {layout.episodes}")  # fmt: skip
        return 0

    return run_stage("episodes", body, args.params)


if __name__ == "__main__":
    sys.exit(main())
