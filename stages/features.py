"""DVC stage `features`: compute the frozen backbone features of every image once.

Writes `<data.root>/features/` (memory-mapped .npy arrays and a manifest). When
`train.cache_backbone_features` is false (training with augmentation, the paper
setup) it writes only a manifest saying the cache is disabled.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simprop.evaluation import resolve_device
from simprop.features import build_feature_cache
from simprop.params import ParamsError, load_params
from simprop.tracking import stage_run


def main() -> int:
    try:
        params = load_params("params.yaml")
    except ParamsError as exc:
        print(f"features: {exc}", file=sys.stderr)
        return 2
    with stage_run("features", params) as run:
        manifest = build_feature_cache(params, Path("."), resolve_device(params.train.device))
        run.set_tags({"cache_enabled": manifest["enabled"], "image_size": manifest["image_size"]})
        if manifest["enabled"]:
            run.log_metrics({"images": len(manifest["images"])})
    if manifest["enabled"]:
        print(f"cached backbone features of {len(manifest['images'])} images, shape {manifest['feature_shape']}")
    else:
        print("feature cache disabled (train.cache_backbone_features: false)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
