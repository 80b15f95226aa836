"""The ``simprop`` command line.

Sub-commands are registered lazily so that ``simprop --help`` stays fast and
importing :mod:`simprop` never pulls in torch or mlflow.
"""

from __future__ import annotations

import argparse
import sys

from simprop.errors import TrackingError
from simprop.infra.tracking.run import sync_pending
from simprop.params import ParamsError, load_params


def _cmd_params(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    for key, value in params.flat().items():
        print(f"{key} = {value}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from simprop.segment.api import SegmentError, segment  # lazy: pulls in torch

    try:
        results = segment(
            args.checkpoint or args.model,
            supports=args.support,
            queries=args.query,
            out_dir=args.out,
            class_id=args.class_id,
            variant=args.variant,
            device=args.device,
            batch_size=args.batch_size,
            foreground_value=args.foreground_value,
            progress=not args.quiet,
            fold=args.fold,
            describe=lambda line: print(line, flush=True),
            tracking_uri=args.tracking_uri,
            amp=args.amp,
        )
    except SegmentError as exc:
        print(f"simprop segment: error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r.query} -> {r.mask} , {r.overlay} (foreground {100 * r.foreground_fraction:.1f}%)")
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment your own images from k support (image, mask) pairs with a trained checkpoint",
        description="Writes <out>/<stem>_mask.png and <out>/<stem>_overlay.png for every query. "
        "Support masks: binary PNGs (0/255 or 0/1), or VOC index PNGs with --class-id.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a trained checkpoint, e.g. models/simpropnet/fold0/seed0/best.pt")
    source.add_argument(
        "--model", metavar="URI",
        help="a registered model version, models:/<name>@<alias> or models:/<name>/<version> "
        "(e.g. models:/simprop-simpropnet@fold0), downloaded from the tracking server",
    )  # fmt: skip
    p.add_argument(
        "--tracking-uri", default=None,
        help="tracking server of --model (default: $MLFLOW_TRACKING_URI, else the repository's mlflow.db)",
    )  # fmt: skip
    p.add_argument(
        "--support", nargs=2, action="append", required=True, metavar=("IMAGE", "MASK"),
        help="a support image and its mask; repeat for k shots",
    )
    p.add_argument("--query", nargs="+", required=True, help="query images and/or folders of images")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--class-id", type=int, default=None, help="class to take from VOC-style index masks")
    p.add_argument("--variant", default=None, help="fail unless the checkpoint is of this variant")
    p.add_argument("--fold", type=int, default=None, help="fail unless the checkpoint was trained on this PASCAL-5i fold")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--amp", default="false", choices=("false", "true", "auto"),
        help="bf16 autocast: auto = where the device runs bf16 natively (avx512_bf16 / amx_bf16 CPU, "
        "bf16 GPU), float32 elsewhere; false (default) = float32, the evaluate stage's masks",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--foreground-value", type=int, default=255, help="mask value written for foreground (1..255)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_segment)


def _cmd_mlflow_sync(args: argparse.Namespace) -> int:
    code = 0
    for path in args.files:
        try:
            sent = sync_pending(path)
            print(f"{path}: sent {sent} kept log calls; the run is complete")
        except TrackingError as exc:
            print(f"simprop mlflow-sync: error: {exc}", file=sys.stderr)
            code = 2
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simprop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="validate params.yaml and print every key")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_cmd_params)
    _add_segment(sub)
    p = sub.add_parser(
        "mlflow-sync",
        help="send the log calls a stage kept while its tracking server was away, and close the run",
        description="A stage whose tracking server stayed away until its end saves what the server did not "
        "take in .simprop/mlflow-pending/<run>.json and names this command.",
    )
    p.add_argument("files", nargs="+", help=".simprop/mlflow-pending/<run>.json files")
    p.set_defaults(func=_cmd_mlflow_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ParamsError as exc:
        print(f"simprop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
