"""The ``bnorm`` command: ``demo``, ``bench``, ``lab``, ``info`` (and tools that register here).

Contracts:

- ``bnorm --help`` and every ``bnorm COMMAND --help`` build their parser without importing
  torch: the options of ``demo`` and ``bench`` are declared here, and each command imports what
  it runs inside its function (``import bnorm`` is itself lazy, see :mod:`bnorm`).
- A user error (a bad option value, an output folder that cannot be written, an unknown name)
  is one line on stderr, ``bnorm COMMAND: error: <what is wrong and what is allowed>``, with
  exit code 2, found before any training or measuring starts. Commands raise :class:`UsageError`
  for errors they find after parsing. ``--debug`` adds the traceback.
- Any other failure is one line with exit code 1 (the traceback with ``--debug``); Ctrl-C exits
  with 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__  # cheap: importing bnorm imports nothing heavy

__all__ = ["UsageError", "build_parser", "main", "output_dir", "parse_case", "positive_int"]


class UsageError(Exception):
    """A mistake on the command line found after parsing: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- option values: each checker names what is allowed ----------------------------------------


def positive_int(text: str) -> int:
    """An integer of at least 1 (argparse ``type=``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


#: ``bnorm bench --case`` layouts: short name -> (layout name, allowed ranks)
CASE_LAYOUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "nc": ("N,C", (2,)),
    "ncl": ("N,C,L", (3,)),
    "nchw": ("NCHW", (4,)),
    "cl": ("channels_last", (4,)),
}


def parse_case(text: str) -> tuple[str, tuple[int, ...]]:
    """``LAYOUT:SHAPE`` (e.g. ``nchw:32x64x28x28``) -> ``(layout name, shape)``.

    LAYOUT is one of :data:`CASE_LAYOUTS` (``nc``, ``ncl``, ``nchw``, ``cl`` = channels_last);
    SHAPE is ``x``-separated sizes of at least 1 whose count fits the layout.
    """
    layout, _, shape = text.strip().lower().partition(":")
    allowed = (
        f"expected LAYOUT:SHAPE with LAYOUT one of {', '.join(CASE_LAYOUTS)} and SHAPE sizes "
        f"joined by x, e.g. nchw:32x64x28x28; got {text!r}"
    )
    if layout not in CASE_LAYOUTS or not shape:
        raise argparse.ArgumentTypeError(allowed)
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(allowed) from None
    name, ranks = CASE_LAYOUTS[layout]
    if len(dims) not in ranks or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"{layout} takes {' or '.join(map(str, ranks))} sizes of at least 1, got {text!r}"
        )
    return name, dims


def output_dir(path: Path, option: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and check that a file can be written there.

    Called before any work starts, so that a bad output folder fails in a second rather than
    after the training. Raises :class:`UsageError` naming ``option``.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(
            f"{option} {str(path)!r} is not a folder bnorm can write to ({reason}); "
            "give a writable folder (it is created if missing)"
        ) from err
    return path


# -- commands ------------------------------------------------------------------------------


def _needs(*modules: str) -> None:
    """Refuse to start when an optional dependency is missing (one line, exit code 2)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"needs {', '.join(missing)}, from the lab extra: pip install 'bnorm[lab]'"
        )


def _say(text: str) -> None:
    """A status line on stdout, from the process that reports (rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def _demo(args: argparse.Namespace) -> int:
    _needs("sklearn", "matplotlib")
    output_dir(args.out)
    _say(
        f"bnorm demo: 3 variants x {args.seeds} seed(s) x {args.epochs} epochs on the article's "
        "two circles, one thread; loading torch and bnorm (a few seconds)"
    )
    from . import demo

    return demo.run_command(args)


def _bench(args: argparse.Namespace) -> int:
    output_dir(args.out)
    which = f"the {'quick' if args.quick else 'default'} set of cases"
    which = f"{len(args.case)} case(s) given" if args.case else which
    _say(
        f"bnorm bench: {which}, bnorm and torch alternating, each case in "
        f"{'this process' if args.one_process else 'a fresh process'}; loading torch and bnorm "
        "(a few seconds)"
    )
    from . import bench

    return bench.run_command(args)


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import ops

    print(f"bnorm {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    if ops.EXTENSION:
        print("operators: C++ extension bnorm._C (torch.ops.bnorm), on torch's thread pool")
    else:
        print("operators: composite path (the C++ extension is not built; see the README)")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the article's example: no BN vs BN after vs BN before the ReLU",
        description="Train the article's two-circles network without batch norm, with it after "
        "and with it before the ReLU, from several seeds; print a table and write curves.png "
        "and results.json.",
    )
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds per variant (default 5)")
    p.add_argument("--epochs", type=positive_int, default=100, help="epochs per run (default 100)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bnorm-out") / "demo",
        help="output folder, created if missing (default bnorm-out/demo)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_demo)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="bnorm vs torch batch norm, side by side (markdown table + CSV)",
        description="Time bnorm's and torch's batch norm on the same tensors, alternately; "
        "print a markdown table and the speed goals, write a CSV under --out.",
    )
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    p.add_argument(
        "--reps", type=positive_int, default=None, help="rounds per measurement (31; quick 15)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument(
        "--case",
        type=parse_case,
        action="append",
        metavar="LAYOUT:SHAPE",
        help="measure this case instead of the default set (repeatable); LAYOUT is nc, ncl, "
        "nchw or cl (channels_last), e.g. cl:32x64x28x28",
    )
    p.add_argument(
        "--out",
        "--results-dir",
        dest="out",
        type=Path,
        default=Path("bnorm-out") / "bench",
        help="folder for the CSV, created if missing (default bnorm-out/bench)",
    )
    p.add_argument(
        "--one-process",
        action="store_true",
        help="measure every case in this process (by default each case gets a fresh one)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_bench)


def _add_info(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "info", help="versions, threads, kernel backends and kernel settings of this install"
    ).set_defaults(func=_info)


def _add_lab(sub: argparse._SubParsersAction) -> None:
    from .lab import cli as lab_cli  # argparse only: its commands import the lab when they run

    lab_cli.add_parser(sub)


#: Commands registered by their own module's ``add_parser(sub)``, for modules that are cheap to
#: import. Each entry is called with the subparsers action.
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_lab,
    _add_bench,
    _add_info,
]

#: Commands whose ``add_parser(sub)`` lives in a module that imports torch:
#: ``(name, one-line help, module)``. The module is imported, and its parser built, only when
#: the command line names the command; otherwise the command is listed with its help alone.
_HEAVY_COMMANDS: list[tuple[str, str, str]] = [
    (
        "doctor",
        "diagnose the batch normalization of a model, and prescribe remedies",
        "bnorm.tools.doctor_report",
    ),
]


def _command_named(argv: Sequence[str]) -> str | None:
    """The first argument that is not an option: the command (global options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``bnorm`` parser; ``argv`` decides which heavy command's parser is built in full."""
    parser = _Parser(
        prog="bnorm",
        description="Batch normalization for PyTorch, done right and proven.",
    )
    parser.add_argument("--version", action="version", version=f"bnorm {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (give it first)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    named = _command_named(argv)
    for name, help_text, module in _HEAVY_COMMANDS:
        if name == named:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bnorm`` command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    prog = f"bnorm {args.command}"
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            traceback.print_exc()
            return 1
        # a KeyError's str() is the repr of its key; its message reads better bare
        raw = err.args[0] if isinstance(err, KeyError) and err.args else err
        text = " ".join(str(raw).split()) or type(err).__name__
        print(f"{prog}: error: {text} (run `bnorm --debug ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
