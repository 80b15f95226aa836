"""DVC stage `download`: the raw VOC2012 + SBD trees under <data.root>/raw.

data.source voc: downloads (resumably, md5-checked) the official VOC2012 tar, SBD benchmark.tgz
and train_noval.txt into <data.root>/downloads/, then extracts them safely and atomically.
data.source synthetic: writes the embedded generated dataset in the same layout.
"""

from __future__ import annotations

import sys

from simprop.data.download import prepare_raw
from simprop.data.layout import DataLayout
from simprop.infra.stage import run_stage, stage_args
from simprop.infra.tracking import stage_run
from simprop.params import Params


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv)

    def body(params: Params) -> int:
        layout = DataLayout(params.data.root)
        with stage_run("download", params) as run:
            prepare_raw(layout, params.data, workers=params.data.workers)
            run.set_tags({"data_root": str(layout.root)})
        print(f"download: {params.data.source} tree ready in {layout.raw}")
        return 0

    return run_stage("download", body, args.params)


if __name__ == "__main__":
    sys.exit(main())
