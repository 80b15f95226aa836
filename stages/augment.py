"""DVC stage `augment`: <data.root>/SegmentationClassAug from the SBD and VOC2012 masks."""

from __future__ import annotations

import sys

from simprop.data.augment import build_segmentation_class_aug
from simprop.data.layout import DataLayout
from simprop.infra.stage import run_stage, stage_args
from simprop.infra.tracking import stage_run
from simprop.params import Params


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv)

    def body(params: Params) -> int:
        layout = DataLayout(params.data.root)
        with stage_run("augment", params) as run:
            counts = build_segmentation_class_aug(layout, workers=params.data.workers)
            run.log_metrics({"labels_from_voc": counts["voc"], "labels_from_sbd": counts["sbd"]})
        print(f"augment: {counts['voc'] + counts['sbd']} labels in {layout.aug} "
              f"({counts['voc']} from VOC2012 SegmentationClass, {counts['sbd']} from SBD cls)")  # fmt: skip
        return 0

    return run_stage("augment", body, args.params)


if __name__ == "__main__":
    sys.exit(main())
