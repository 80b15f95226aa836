"""DVC stage `backbone`: write the frozen ResNet-50 weights (backbone.path) every later stage uses."""

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
            from simprop.infra.tracking import stage_run
            from simprop.model.backbone import materialise_backbone

        with stage_run("backbone", params) as run:
            provenance = materialise_backbone(params, Path("."))
            run.set_tags({f"backbone_{k}": v for k, v in provenance.items()})
        print(f"backbone ({provenance['source']}) written to {params.backbone.path}, sha256 {provenance['sha256'][:12]}")
        return 0

    return run_stage("backbone", body, args.params)


if __name__ == "__main__":
    sys.exit(main())
