"""``bnorm lab list | run NAME|all [--quick] [--seeds K] [--out DIR] | report DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _list(args: argparse.Namespace) -> int:
    from .experiments import all_experiments

    for exp in all_experiments():
        print(f"{exp.name:20s} {exp.title}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .. import distributed as bd
    from .runner import run_lab

    # Under torchrun: join the process group so the training loops run data-parallel
    # (SyncBatchNorm + DDP) and only rank 0 writes and prints; otherwise nothing happens.
    with bd.process_group_from_env():
        main = bd.is_main_process()
        records = run_lab(
            args.names,
            quick=args.quick,
            seeds=args.seeds,
            out=Path(args.out),
            progress=not args.no_progress,
            threads=args.threads,
        )
    if not main:
        return 0
    width = max(len(r["name"]) for r in records)
    for r in records:
        print(f"{r['name']:{width}s}  {r['verdict']:13s}  {r['headline']}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .runner import summarize_dir

    records = summarize_dir(Path(args.dir))
    print(f"report: {write_report(Path(args.dir), records)}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bnorm lab`` and its sub-commands."""
    lab = subparsers.add_parser(
        "lab", help="measure every claim of the article (experiments, plots, report.html)"
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)
    sub.add_parser("list", help="the experiments").set_defaults(func=_list)
    run = sub.add_parser("run", help="run experiments and write the report")
    run.add_argument("names", nargs="+", metavar="NAME", help="experiment names, or 'all'")
    run.add_argument("--quick", action="store_true", help="CI-sized runs (minutes for all)")
    run.add_argument("--seeds", type=int, default=None, help="seeds per experiment")
    run.add_argument("--out", default="bnorm-out/lab", help="output directory (resumed)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    run.set_defaults(func=_run)
    report = sub.add_parser("report", help="recompute summaries and rebuild report.html")
    report.add_argument("dir", help="a directory written by `bnorm lab run`")
    report.set_defaults(func=_report)
