"""The ``simprop`` command line.

Sub-commands are registered lazily so that ``simprop --help`` stays fast and
importing :mod:`simprop` never pulls in torch or mlflow.
"""

from __future__ import annotations

import argparse
import sys

from simprop.params import ParamsError, load_params


def _cmd_params(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    for key, value in params.flat().items():
        print(f"{key} = {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simprop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="validate params.yaml and print every key")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_cmd_params)
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
