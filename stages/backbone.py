"""DVC stage `backbone`: write the frozen ResNet-50 weights (backbone.path) every later stage uses."""

from __future__ import annotations

import sys
from pathlib import Path

from simprop.params import Params
from simprop.stage import run_stage


def main() -> int:
    def body(params: Params) -> int:
        from simprop.backbone import materialise_backbone

        provenance = materialise_backbone(params, Path("."))
        print(f"backbone ({provenance['source']}) written to {params.backbone.path}, sha256 {provenance['sha256'][:12]}")
        return 0

    return run_stage("backbone", body)


if __name__ == "__main__":
    sys.exit(main())
