"""The ``bnorm`` command. Each subcommand lives with the code it runs and registers itself here."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

import torch

from . import __version__, bench, demo, ops
from .lab import cli as lab_cli
from .tools import doctor_report


def _info(args: argparse.Namespace) -> int:
    print(f"bnorm {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    if ops.EXTENSION:
        print("operators: C++ extension bnorm._C (torch.ops.bnorm), on torch's thread pool")
    else:
        print("operators: composite path (the C++ extension is not built; see the README)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnorm",
        description="Batch normalization for PyTorch, done right and proven.",
    )
    parser.add_argument("--version", action="version", version=f"bnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_parser(sub)
    bench.add_parser(sub)
    lab_cli.add_parser(sub)
    doctor_report.add_parser(sub)
    info = sub.add_parser(
        "info",
        help="versions, threads, kernel backends and kernel settings of this install",
    )
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
