"""DVC stage `evaluate@<variant>-<fold>`: score the selected checkpoint on the test episodes.

Usage: python stages/evaluate.py --variant simpropnet --fold 0
For each test seed and shot count: mIoU (over the fold's 5 classes), FB-IoU and per-class IoU,
scored as evaluate.resolution / evaluate.void say; the identical-input test (paper Table 5); and
the support-use controls: the prototype matcher (every test set and shot), the model with
a mismatched support (every test set, 1-shot), the all-foreground predictor and the
untrained network (first test set), and the gains read from them (``support_use``).
Writes metrics/evaluate/<variant>_fold<i>.json and
outputs/evaluate/<variant>_fold<i>/qualitative.png; logs everything to MLflow.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simprop.params import Params
from simprop.stage import check_matrix_entry, matrix_args, run_stage


def main(argv: list[str] | None = None) -> int:
    args = matrix_args(__doc__, argv)

    def body(params: Params) -> int:
        check_matrix_entry(params, args.variant, args.fold)

        from simprop.timing import span

        with span("imports"):  # what this stage needs, imported once (simprop.timing)
            from simprop.evaluation import evaluate_model, qualitative_rows, resolve_device, write_json
            from simprop.features import open_feature_cache
            from simprop.model import build_model, expected_identity, load_checkpoint
            from simprop.tracking import stage_run
            from simprop.training import TrainPaths
            from simprop.visualize import save_qualitative

        root = Path(".")
        device = resolve_device(params.evaluate.device, "evaluate.device")
        paths = TrainPaths(root, args.variant, args.fold)
        untrained = build_model(args.variant, params.model, init_seed=params.train.seed).to(device).eval()
        # the checkpoint must be this stage's: variant, fold, protocol, backbone and fold lists
        # (not the training code's digest: see simprop/model/checkpoint.py)
        expected = expected_identity(params, args.variant, args.fold, root, untrained.backbone.checksum())
        model, meta = load_checkpoint(paths.best, map_location=device, expected=expected)
        cache = open_feature_cache(params, root, params.evaluate.image_size, model.backbone.checksum())
        out = root / "metrics" / "evaluate" / f"{args.variant}_fold{args.fold}.json"
        figure = root / "outputs" / "evaluate" / f"{args.variant}_fold{args.fold}" / "qualitative.png"
        shots = ",".join(str(s) for s in params.evaluate.shots)
        with stage_run("evaluate", params, variant=args.variant, fold=args.fold, shots=shots) as run:
            run.set_tags({"checkpoint_epoch": meta.get("epoch"), "checkpoint_val_miou": meta.get("val_miou")})
            record, runner = evaluate_model(
                params, model, args.variant, args.fold, root, device, cache, untrained=untrained, log=run.log_metrics
            )
            record["checkpoint"] = {"epoch": meta.get("epoch"), "val_miou": meta.get("val_miou")}
            write_json(out, record)
            rows = qualitative_rows(params, runner, args.fold, root, params.report.num_qualitative)
            if rows:
                save_qualitative(rows, figure, title=f"{args.variant}, {params.splits.protocol} fold {args.fold}, 1-shot")
            else:
                figure.parent.mkdir(parents=True, exist_ok=True)
            for shot in params.evaluate.shots:
                entry = record[f"shot{shot}"]
                run.log_metrics({f"shot{shot}_miou_mean": entry["miou_mean"], f"shot{shot}_miou_std": entry["miou_std"],
                                 f"shot{shot}_fbiou_mean": entry["fbiou_mean"],
                                 f"shot{shot}_classes_scored": entry["classes_scored"]})
            if "identical" in record:
                run.log_metrics({"identical_miou": record["identical"]["miou"]})
            run.log_metrics({"mismatched_miou_mean": record["mismatched"]["miou_mean"],
                             **{f"matcher_{k}_miou_mean": v["miou_mean"] for k, v in record["matcher"].items()},
                             **record["support_use"]})  # fmt: skip
            run.log_metrics({k: v for k, v in record["reference"].items() if v is not None})
            run.log_artifact(out)
            if figure.is_file():
                run.log_artifact(figure)
        summary = ", ".join(f"{s}-shot mIoU {record[f'shot{s}']['miou_mean']:.2f}" for s in params.evaluate.shots)
        print(f"{args.variant} fold {args.fold}: {summary}")
        return 0

    return run_stage(f"evaluate {args.variant} fold {args.fold}", body)


if __name__ == "__main__":
    sys.exit(main())
