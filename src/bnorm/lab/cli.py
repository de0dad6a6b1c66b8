"""``bnorm lab list | run NAME|all | report DIR | stability``.

User errors (an unknown experiment, an unwritable or invalid ``--out``, a missing report
directory, a bad number) are checked before anything trains and reported as one line on stderr
naming the option and what it allows, with exit code 2 — or raised, with their traceback, under
the global ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

EXIT_USAGE = 2


class LabUsageError(Exception):
    """A user error of ``bnorm lab``: its message is the one line printed."""


def _fail(args: argparse.Namespace, err: Exception) -> int:
    if getattr(args, "debug", False):
        raise err
    print(f"bnorm lab {args.lab_command}: error: {err}", file=sys.stderr)
    return EXIT_USAGE


def _check_names(names: list[str]) -> None:
    from .experiments import all_experiments

    known = [e.name for e in all_experiments()]
    unknown = [n for n in names if n != "all" and n not in known]
    if unknown:
        raise LabUsageError(
            f"NAME: no experiment {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(known)}, or all"
        )


def _check_out(out: str, option: str = "--out") -> Path:
    """``out`` exists or can be created, is a directory, and takes a new file."""
    path = Path(out)
    if not out.strip():
        raise LabUsageError(f"{option}: an empty path; give a writable directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError(str(path))
        fd, probe = tempfile.mkstemp(dir=path, prefix=".bnorm-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LabUsageError(
            f"{option}: cannot write to {out!r} ({reason}); give a writable directory"
        ) from None
    return path


def _check_positive(value: int | None, option: str, least: int = 1) -> None:
    if value is not None and value < least:
        raise LabUsageError(f"{option}: {value} is not allowed; give an integer ≥ {least}")


def _check_run_options(args: argparse.Namespace) -> None:
    _check_positive(args.seeds, "--seeds")
    _check_positive(args.max_seeds, "--max-seeds")
    if args.seeds is not None and args.max_seeds is not None and args.max_seeds < args.seeds:
        raise LabUsageError(
            f"--max-seeds: {args.max_seeds} is below --seeds {args.seeds}; give at least that"
        )
    _check_positive(args.threads, "--threads")
    if args.budget is not None and not (args.budget > 0 and args.budget < float("inf")):
        raise LabUsageError(f"--budget: {args.budget} is not allowed; give minutes > 0")
    if args.first_seed < 0:
        raise LabUsageError(f"--first-seed: {args.first_seed} is not allowed; give an integer ≥ 0")


def _list(args: argparse.Namespace) -> int:
    from .experiments import all_experiments

    for exp in all_experiments():
        print(f"{exp.name:20s} {exp.title}")
    return 0


def _print_records(records: list[dict]) -> None:
    from .verdict import interval_text_json

    width = max((len(r["name"]) for r in records), default=0)
    for r in records:
        checks = "; ".join(f"{c['label']} {interval_text_json(c)}" for c in r["checks"])
        print(f"{r['name']:{width}s}  {r['verdict']:13s}  {checks}  ({r['seeds']} seeds)")


def _run(args: argparse.Namespace) -> int:
    try:
        _check_run_options(args)
        _check_names(args.names)
        out = _check_out(args.out)
    except LabUsageError as err:
        return _fail(args, err)
    from .. import distributed as bd
    from .runner import run_lab

    print(
        f"bnorm lab: {'quick' if args.quick else 'full'} run of "
        f"{', '.join(args.names)} into {out} (resumable)",
        file=sys.stderr,
    )
    # Under torchrun: join the process group so the training loops run data-parallel
    # (SyncBatchNorm + DDP) and only rank 0 writes and prints; otherwise nothing happens.
    with bd.process_group_from_env():
        main = bd.is_main_process()
        records = run_lab(
            args.names,
            quick=args.quick,
            seeds=args.seeds,
            max_seeds=args.max_seeds,
            first_seed=args.first_seed,
            budget=None if args.budget is None else args.budget * 60,
            out=out,
            progress=not args.no_progress,
            threads=args.threads,
        )
    if not main:
        return 0
    _print_records(records)
    print(f"report: {out / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .runner import CorruptFile

    directory = Path(args.dir)
    try:
        if not directory.is_dir():
            raise LabUsageError(f"DIR: {args.dir!r} is not a directory written by `bnorm lab run`")
        if not (directory / "lab.json").is_file():
            raise LabUsageError(
                f"DIR: {args.dir!r} has no lab.json; give a directory written by `bnorm lab run`"
            )
        _check_out(args.dir, "DIR")
    except LabUsageError as err:
        return _fail(args, err)
    from .report import write_report
    from .runner import summarize_dir

    try:
        records = summarize_dir(directory)
    except CorruptFile as err:
        return _fail(args, LabUsageError(f"{err}; run `bnorm lab run` into it again"))
    _print_records(records)
    print(f"report: {write_report(directory, records)}")
    return 0


def _stability(args: argparse.Namespace) -> int:
    try:
        _check_names(args.names)
        _check_positive(args.threads, "--threads")
        _check_positive(args.seeds, "--seeds")
        if args.budget is not None and not (0 < args.budget < float("inf")):
            raise LabUsageError(f"--budget: {args.budget} is not allowed; give minutes > 0")
        out = _check_out(args.out)
        if args.docs is not None:
            _check_out(str(Path(args.docs).parent), "--docs")
    except LabUsageError as err:
        return _fail(args, err)
    from .runner import run_stability, write_text_atomic

    print(
        f"bnorm lab stability: two {'quick' if args.quick else 'full'} runs of "
        f"{', '.join(args.names)} (seeds from 0 and from 1000) into {out}",
        file=sys.stderr,
    )
    text = run_stability(
        args.names,
        quick=args.quick,
        out=out,
        progress=not args.no_progress,
        threads=args.threads,
        seeds=args.seeds,
        budget=None if args.budget is None else args.budget * 60,
        table_only=args.table_only,
    )
    if args.docs is not None:
        write_text_atomic(Path(args.docs), text)
    print(text)
    return 0


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report a parse error as one line (no usage block), exit code 2."""

    def error(message: str) -> None:
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    parser.error = error  # type: ignore[method-assign]
    return parser


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bnorm lab`` and its sub-commands."""
    lab = _one_line_errors(
        subparsers.add_parser(
            "lab", help="measure every claim of the article (experiments, plots, report.html)"
        )
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)
    sub.add_parser("list", help="the experiments").set_defaults(func=_list)
    run = _one_line_errors(sub.add_parser("run", help="run experiments and write the report"))
    run.add_argument("names", nargs="+", metavar="NAME", help="experiment names, or 'all'")
    run.add_argument(
        "--quick", action="store_true", help="CI-sized runs (within 2 minutes for all)"
    )
    run.add_argument(
        "--seeds",
        type=_integer,
        default=None,
        help="seeds to start with (default: each own; fewer than 3 never decide)",
    )
    run.add_argument(
        "--max-seeds",
        type=_integer,
        default=None,
        help="at most this many seeds while a verdict is inconclusive (default: each own)",
    )
    run.add_argument(
        "--first-seed",
        type=_integer,
        default=0,
        help="seeds are numbered from this one (default 0)",
    )
    run.add_argument(
        "--budget",
        type=_number,
        default=None,
        help="minutes after which no seed is added (default 19, quick: under 2)",
    )
    run.add_argument("--out", default="bnorm-out/lab", help="output directory (resumed)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--threads", type=_integer, default=1, help="torch threads (default 1)")
    run.set_defaults(func=_run)
    report = _one_line_errors(
        sub.add_parser("report", help="recompute summaries and rebuild report.html")
    )
    report.add_argument("dir", help="a directory written by `bnorm lab run`")
    report.set_defaults(func=_report)
    stab = _one_line_errors(
        sub.add_parser(
            "stability",
            help="run the whole lab twice with disjoint seeds; table of both verdicts per claim",
        )
    )
    stab.add_argument(
        "names", nargs="*", default=["all"], metavar="NAME", help="experiments (default: all)"
    )
    stab.add_argument("--quick", action="store_true", help="two quick runs instead of full ones")
    stab.add_argument("--out", default="bnorm-out/lab-stability", help="output directory")
    stab.add_argument(
        "--seeds",
        type=_integer,
        default=None,
        help="seeds to start with (default: each own; fewer than 3 never decide)",
    )
    stab.add_argument(
        "--budget", type=_number, default=None, help="minutes per run after which no seed is added"
    )
    stab.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: the table from OUT/seeds-0 and OUT/seeds-1000 as they are",
    )
    stab.add_argument("--docs", default=None, help="also write the Markdown table to this file")
    stab.add_argument("--no-progress", action="store_true", help="no progress bar")
    stab.add_argument("--threads", type=_integer, default=1, help="torch threads (default 1)")
    stab.set_defaults(func=_stability)
