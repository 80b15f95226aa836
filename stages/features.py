"""DVC stage `features`: compute the frozen backbone features of every image once.

Writes `<data.root>/features/` (memory-mapped .npy arrays and a manifest) through
`<data.root>/features.tmp`, removed on any failure. When `train.cache_backbone_features`
is false (training with augmentation, the paper setup) it writes only a manifest saying
the cache is disabled.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simprop.infra.stage import run_stage, stage_args
from simprop.params import Params


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv)

    def body(params: Params) -> int:
        from simprop.infra.timing import span

        with span("imports"):  # what this stage needs, imported once (simprop.infra.timing)
            from simprop.engine.features import build_feature_cache
            from simprop.infra.device import resolve_device
            from simprop.infra.tracking import stage_run

        with stage_run("features", params) as run:
            manifest = build_feature_cache(params, Path("."), resolve_device(params.train.device, "train.device"))
            run.set_tags({"cache_enabled": manifest["enabled"], "image_size": manifest["image_size"]})
            if manifest["enabled"]:
                run.log_metrics({"images": len(manifest["images"])})
        if manifest["enabled"]:
            print(f"features: cached backbone features of {len(manifest['images'])} images, shape {manifest['feature_shape']}")
        else:
            print("features: feature cache disabled (train.cache_backbone_features: false)")
        return 0

    return run_stage("features", body, args.params)


if __name__ == "__main__":
    sys.exit(main())
