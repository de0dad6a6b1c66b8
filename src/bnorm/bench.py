"""``bnorm bench``: bnorm's batch norm against torch's, side by side on the same tensors.

For every case (a shape and a memory layout, float32) the same input is run through a bnorm
layer and a torch layer, alternately (which one goes first rotates too), ``--reps`` times;
each table entry is the median over those rounds, and each ratio the median of the round-by-
round ratios, so a burst of load on a shared machine hits both sides of a round alike. Measured:

- training forward+backward (``y = bn(x); y.backward(dy)``, parameters with gradients);
- evaluation forward under ``torch.no_grad()``;
- ``cold copy``: ``dst.copy_(x)`` right after the caches were flushed (a read of twice the
  last-level cache), the time the memory system needs for one read and one write of the input;
  training is compared with it (the floor of batch norm's training is 3.5-4 of these), in
  rounds of its own with bnorm's training, so that no flush lands in the bnorm-torch rounds;
- ``clone``: ``x.clone()`` in a loop (allocation plus a cache-warm copy, the least any op
  returning a new tensor pays); evaluation is compared with it;
- with ``--compile``, ``torch.compile`` of torch's layer as a third contender.

The table is printed as markdown, followed by the project's speed goals checked against the
numbers just measured, and the inference speedup of :func:`bnorm.fold` on a small conv net. A
CSV goes to ``<--out>/<machine kind>-torch<version>.csv`` (default ``bnorm-out/bench/``, relative
to the current folder: never into the source tree, whose ``benchmarks/results/`` holds curated
runs). The options are declared and checked in :mod:`bnorm.cli`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import bnorm
from bnorm import bench_models
from bnorm.cli import parse_case

__all__ = [
    "DEFAULT_CASES",
    "GOALS",
    "QUICK_CASES",
    "Case",
    "Goal",
    "cpu_model",
    "fold_line",
    "goals_table",
    "machine_kind",
    "measure_case",
    "run",
    "run_command",
]


@dataclass(frozen=True)
class Case:
    """A float32 input of ``shape`` in ``layout``: "N,C", "N,C,L", "NCHW" or "channels_last"."""

    layout: str
    shape: tuple[int, ...]

    @property
    def megabytes(self) -> float:
        return math.prod(self.shape) * 4 / 2**20


DEFAULT_CASES = [
    Case("N,C", (32, 50)),  # the demo's batch: dispatch overhead dominates
    Case("N,C", (8192, 256)),
    Case("N,C", (65536, 256)),
    Case("N,C,L", (64, 128, 256)),
    Case("NCHW", (32, 32, 16, 16)),
    Case("NCHW", (64, 64, 28, 28)),
    Case("NCHW", (32, 256, 14, 14)),
    Case("NCHW", (128, 64, 56, 56)),
    Case("NCHW", (128, 512, 4, 4)),  # small planes: a CIFAR ResNet's last stage
    Case("channels_last", (64, 64, 28, 28)),
    Case("channels_last", (32, 256, 14, 14)),
]
QUICK_CASES = [
    Case("N,C", (32, 50)),
    Case("N,C", (8192, 256)),
    Case("N,C,L", (32, 128, 256)),
    Case("NCHW", (32, 64, 28, 28)),
    Case("channels_last", (32, 64, 28, 28)),
]


#: where the processor is described (a module attribute, so that tests can point it elsewhere)
CPUINFO = Path("/proc/cpuinfo")

_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


def cpuinfo(field: str) -> str | None:
    """The first value of ``field`` (e.g. ``"model name"``) in ``/proc/cpuinfo``, or None
    (not Linux, or no such field)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def cpu_vendor() -> str | None:
    """``"intel"``, ``"amd"``, another vendor's id in lower case, or None where unknown."""
    vendor = cpuinfo("vendor_id")
    return None if vendor is None else _VENDORS.get(vendor, vendor.lower())


def cpu_model() -> str:
    """The processor's model name, e.g. ``AMD EPYC`` (``platform.processor()`` off Linux)."""
    return cpuinfo("model name") or platform.processor() or "unknown"


def machine_kind() -> str:
    """e.g. ``x86_64-2core-intel``: what the results file is named after. The vendor is part of
    it because machines of one kind here come with Intel or AMD processors, whose ratios
    differ (torch's kernels and the caches differ as much as bnorm's loops do)."""
    kind = f"{platform.machine()}-{os.cpu_count()}core"
    vendor = cpu_vendor()
    return kind if vendor is None else f"{kind}-{vendor}"


def _layers(case: Case) -> tuple[nn.Module, nn.Module]:
    rank = len(case.shape)
    c = case.shape[1]
    if rank in (2, 3):
        return bnorm.BatchNorm1d(c), nn.BatchNorm1d(c)
    if rank == 4:
        return bnorm.BatchNorm2d(c), nn.BatchNorm2d(c)
    return bnorm.BatchNorm3d(c), nn.BatchNorm3d(c)


def _input(case: Case, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=g)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


#: each timed sample is a run of consecutive calls lasting about this long (at least 3 calls)
SAMPLE_SECONDS = 5e-3


def _calls_per_sample(fn: Callable[[], object]) -> int:
    """Calls per timed sample: at least 3, and enough to last ``SAMPLE_SECONDS`` (a tiny tensor
    takes microseconds). A sample of consecutive calls measures each contender in its own
    steady state (its data in cache, its allocations reused as they would be in a loop) rather
    than in the state the other contender left; the per-call time is the sample's mean. The
    calibration takes the median of a few single calls, so one preempted call does not set it."""
    once = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        once.append(time.perf_counter() - start)
    return max(3, min(5000, int(SAMPLE_SECONDS / max(statistics.median(once), 1e-7))))


def _time(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


@dataclass(frozen=True)
class _Cold:
    """A function timed once per sample, right after ``setup`` (untimed) ran."""

    setup: Callable[[], object]
    fn: Callable[[], object]


def _alternate(fns: dict[str, Callable[[], object] | _Cold], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` samples each, taken round-robin; the order
    rotates every round so no function always runs right after another."""
    names = list(fns)
    # Warm up, round-robin as measured, for at least 10 rounds and 0.3 s: the first calls load
    # compiled code and fill caches, and the C library's allocator needs a few rounds of
    # allocations and frees before its reuse of freed memory settles.
    start, rounds = time.perf_counter(), 0
    while rounds < 10 or time.perf_counter() - start < 0.3:
        for f in fns.values():
            if isinstance(f, _Cold):
                f.setup()
                f.fn()
            else:
                f()
        rounds += 1
    calls = {name: 1 if isinstance(f, _Cold) else _calls_per_sample(f) for name, f in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            f = fns[name]
            if isinstance(f, _Cold):
                f.setup()
                times[name].append(_time(f.fn, 1))
            else:
                # one untimed call first: the sample then starts in this contender's own
                # steady state, not in the one the previous contender (or the cold copy's
                # cache flush) left, whose cost would land on whoever runs next
                f()
                times[name].append(_time(f, calls[name]))
    return times


def _llc_bytes() -> int:
    """The last-level cache's size (Linux sysfs), or 32 MiB where it cannot be read."""
    size = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        size = max(size, value)
    return size or 32 * 2**20


_flush_buffer: torch.Tensor | None = None


def _flush_caches() -> None:
    """Read a buffer twice the last-level cache's size, so that nothing else stays cached.

    Read, not written: a written flush leaves the caches full of dirty lines whose write-back
    lands on whatever runs next. Either way a flush slows the next function, which is why the
    cold copy is timed in rounds of its own (see measure_case)."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.ones(2 * _llc_bytes() // 4)
    _flush_buffer.sum()


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def _train_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer(x).backward(dy)

    return step


def measure_case(case: Case, reps: int, compile: bool = False) -> dict[str, float | str]:
    """One row of the table: medians (ms) and median round-by-round ratios for ``case``."""
    ours, theirs = _layers(case)
    x = _input(case)
    xg = x.clone().requires_grad_()
    dy = _input(case, seed=1)
    dst = torch.empty_like(x)
    train: dict[str, Callable[[], object] | _Cold] = {
        "bnorm": _train_step(ours, xg, dy),
        "torch": _train_step(theirs, xg, dy),
    }
    compiled = None
    if compile:
        compiled = torch.compile(_layers(case)[1])
        train["compile"] = _train_step(compiled, xg, dy)
    t = _alternate(train, reps)
    # The cold copy in rounds of its own, with bnorm: its cache flush slows whatever runs next,
    # and not both contenders alike, so it stays out of the bnorm-torch rounds; here bnorm
    # always runs right after a flush (the conservative side for the "≤ 5× a cold copy" goal).
    c = _alternate(
        {"bnorm": train["bnorm"], "cold_copy": _Cold(_flush_caches, lambda: dst.copy_(x))}, reps
    )
    row: dict[str, float | str] = {
        "layout": case.layout,
        "shape": "x".join(map(str, case.shape)),
        "MB": round(case.megabytes, 2),
        "train_bnorm_ms": statistics.median(t["bnorm"]) * 1e3,
        "train_torch_ms": statistics.median(t["torch"]) * 1e3,
        "train_torch_over_bnorm": _median_ratio(t["torch"], t["bnorm"]),
        "cold_copy_ms": statistics.median(c["cold_copy"]) * 1e3,
        "train_bnorm_over_cold_copy": _median_ratio(c["bnorm"], c["cold_copy"]),
    }
    if compiled is not None:
        row["train_compile_ms"] = statistics.median(t["compile"]) * 1e3
        row["train_compile_over_bnorm"] = _median_ratio(t["compile"], t["bnorm"])
    for layer in (ours, theirs, compiled):
        if layer is not None:
            layer.eval()
    evals: dict[str, Callable[[], object] | _Cold] = {
        "bnorm": lambda: ours(x),
        "torch": lambda: theirs(x),
        "clone": lambda: x.clone(),
    }
    if compiled is not None:
        evals["compile"] = lambda: compiled(x)
    with torch.no_grad():
        e = _alternate(evals, reps)
    row.update(
        {
            "eval_bnorm_ms": statistics.median(e["bnorm"]) * 1e3,
            "eval_torch_ms": statistics.median(e["torch"]) * 1e3,
            "eval_torch_over_bnorm": _median_ratio(e["torch"], e["bnorm"]),
            "clone_ms": statistics.median(e["clone"]) * 1e3,
            "eval_bnorm_over_clone": _median_ratio(e["bnorm"], e["clone"]),
        }
    )
    if compiled is not None:
        row["eval_compile_ms"] = statistics.median(e["compile"]) * 1e3
        row["eval_compile_over_bnorm"] = _median_ratio(e["compile"], e["bnorm"])
    return row


def _conv_net() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), nn.AdaptiveAvgPool2d(1))


def measure_fold(reps: int) -> dict[str, float]:
    """Inference of a small conv net (3 conv+BN+ReLU blocks) before and after bnorm.fold."""
    torch.manual_seed(0)
    model = _conv_net()
    with torch.no_grad():  # a few training batches give the running statistics real values
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    folded = bnorm.fold(model)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        t = _alternate({"model": lambda: model(x), "folded": lambda: folded(x)}, reps)
        expected, got = model(x), folded(x)
    error = float((got - expected).abs().max() / expected.abs().max())
    return {
        "model_ms": statistics.median(t["model"]) * 1e3,
        "folded_ms": statistics.median(t["folded"]) * 1e3,
        "speedup": _median_ratio(t["model"], t["folded"]),
        "max_rel_error": error,
    }


_COLUMNS = [
    ("layout", "layout", "{}"),
    ("shape", "shape", "{}"),
    ("MB", "MB", "{:g}"),
    ("train_bnorm_ms", "train bnorm ms", "{:.3f}"),
    ("train_torch_ms", "train torch ms", "{:.3f}"),
    ("train_torch_over_bnorm", "torch/bnorm", "**{:.2f}×**"),
    ("train_bnorm_over_cold_copy", "bnorm/cold copy", "{:.1f}"),
    ("train_compile_ms", "train compile ms", "{:.3f}"),
    ("train_compile_over_bnorm", "compile/bnorm", "{:.2f}×"),
    ("eval_bnorm_ms", "eval bnorm ms", "{:.3f}"),
    ("eval_torch_ms", "eval torch ms", "{:.3f}"),
    ("eval_torch_over_bnorm", "torch/bnorm", "**{:.2f}×**"),
    ("eval_bnorm_over_clone", "bnorm/clone", "{:.2f}"),
    ("eval_compile_ms", "eval compile ms", "{:.3f}"),
    ("eval_compile_over_bnorm", "compile/bnorm", "{:.2f}×"),
]


def markdown_table(rows: Sequence[dict[str, float | str]]) -> str:
    cols = [c for c in _COLUMNS if c[0] in rows[0]]
    lines = [
        "| " + " | ".join(title for _, title, _ in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in cols) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Goal:
    """A speed goal of the project, checked against a measured row."""

    text: str
    key: str
    bound: float
    at_least: bool  #: the measured value must be >= bound (else <= bound)
    applies: Callable[[dict[str, float | str]], bool]

    def met(self, row: dict[str, float | str]) -> bool:
        value = float(row[self.key])
        return value >= self.bound if self.at_least else value <= self.bound


def _mb(row: dict[str, float | str]) -> float:
    return float(row["MB"])


#: the project's speed goals (sizes in MiB of float32 input)
GOALS = [
    Goal(
        "training ≥ 2× faster than torch, NCHW, 1–32 MB",
        "train_torch_over_bnorm",
        2.0,
        True,
        lambda r: r["layout"] == "NCHW" and 1 <= _mb(r) <= 32,
    ),
    Goal(
        "training ≥ 1.5× faster than torch, (N,C), (N,C,L), channels_last, 1–32 MB",
        "train_torch_over_bnorm",
        1.5,
        True,
        lambda r: r["layout"] != "NCHW" and 1 <= _mb(r) <= 32,
    ),
    Goal(
        "training ≥ 1.3× faster than torch, 64 MB and more",
        "train_torch_over_bnorm",
        1.3,
        True,
        lambda r: _mb(r) >= 64,
    ),
    Goal(
        "training ≤ 5× a cold-cache copy, 1–32 MB",
        "train_bnorm_over_cold_copy",
        5.0,
        False,
        lambda r: 1 <= _mb(r) <= 32,
    ),
    Goal(
        "evaluation ≤ 1.5× x.clone(), 1 MB and more",
        "eval_bnorm_over_clone",
        1.5,
        False,
        lambda r: _mb(r) >= 1,
    ),
    Goal(
        "tiny tensors: training never slower than torch",
        "train_torch_over_bnorm",
        1.0,
        True,
        lambda r: _mb(r) < 1,
    ),
    Goal(
        "tiny tensors: evaluation never slower than torch",
        "eval_torch_over_bnorm",
        1.0,
        True,
        lambda r: _mb(r) < 1,
    ),
]


def goals_table(rows: Sequence[dict[str, float | str]]) -> tuple[str, int]:
    """The goals that apply to the measured rows, one line per (goal, case), and how many
    were missed."""
    lines = ["| goal | case | measured | met |", "|---|---|---|---|"]
    missed = 0
    for goal in GOALS:
        for row in rows:
            if not goal.applies(row):
                continue
            ok = goal.met(row)
            missed += not ok
            lines.append(
                f"| {goal.text} | {row['layout']} {row['shape']} | "
                f"{float(row[goal.key]):.2f} | {'yes' if ok else '**no**'} |"
            )
    return "\n".join(lines), missed


def run(
    cases: Sequence[Case],
    reps: int,
    compile: bool = False,
    progress: bool = True,
    fresh_process: bool = True,
) -> tuple[list[dict[str, float | str]], dict[str, float]]:
    """Measure every case (each in a fresh process by default) and the fold speedup.

    Why a fresh process per case: torch's outputs come from the C library's ``malloc``, whose
    reuse of freed memory depends on what the process allocated before (after the largest
    cases it stops returning blocks to the operating system, and torch stops paying page
    faults). Measured in one process, a case's torch time would depend on the cases run before
    it; each case therefore starts from the same state, that of a new training process.
    """
    rows = []
    for case in tqdm(cases, desc="bnorm bench", disable=not progress, unit="case"):
        if fresh_process:
            rows.append(_measure_in_subprocess(case, reps, compile))
        else:
            rows.append(measure_case(case, reps, compile))
    return rows, measure_fold(reps)


def _case_text(case: Case) -> str:
    short = {"N,C": "nc", "N,C,L": "ncl", "NCHW": "nchw", "channels_last": "cl"}[case.layout]
    return f"{short}:" + "x".join(map(str, case.shape))


def _measure_in_subprocess(case: Case, reps: int, compile: bool) -> dict[str, float | str]:
    """:func:`measure_case` in a new Python process with this one's thread count, its row
    returned as JSON."""
    command = [
        sys.executable,
        "-m",
        "bnorm.bench",
        _case_text(case),
        str(reps),
        str(torch.get_num_threads()),
        "compile" if compile else "eager",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bnorm bench: measuring {_case_text(case)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(argv: Sequence[str]) -> None:
    """``python -m bnorm.bench CASE REPS THREADS compile|eager``: one row as JSON."""
    case_text, reps, threads, mode = argv
    torch.set_num_threads(int(threads))
    row = measure_case(Case(*parse_case(case_text)), int(reps), mode == "compile")
    print(json.dumps(row))


def fold_line(folding: dict[str, float]) -> str:
    """The report's line on :func:`bnorm.fold`: times before and after, and the ratio in words
    ("faster" when folding helped, "slower" when it did not)."""
    speedup = folding["speedup"]
    ratio = f"{speedup:.2f}× faster" if speedup >= 1 else f"{1 / speedup:.2f}× slower"
    return (
        f"bnorm.fold on a 3-block conv net, eval, batch 8x3x32x32: "
        f"{folding['model_ms']:.3f} ms -> {folding['folded_ms']:.3f} ms "
        f"(**{ratio}**; max relative difference {folding['max_rel_error']:.1e})"
    )


def run_command(args: argparse.Namespace) -> int:
    """``bnorm bench`` after :mod:`bnorm.cli` checked the options (``--out`` is writable)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reps = args.reps if args.reps is not None else (15 if args.quick else 31)
    cases = [Case(*c) for c in args.case] if args.case else None
    cases = cases or (QUICK_CASES if args.quick else DEFAULT_CASES)
    load_before = _load()
    rows, folding = run(
        cases,
        reps,
        args.compile,
        progress=not args.no_progress,
        fresh_process=not args.one_process,
    )
    load = f"{load_before}/{_load()}"
    version = torch.__version__.split("+")[0]
    print(
        f"\nbnorm {bnorm.__version__}, torch {torch.__version__}, {machine_kind()} "
        f"({cpu_model()}), "
        f"{torch.get_num_threads()} threads, float32, median of {reps} alternating rounds, "
        f"{'one process' if args.one_process else 'a fresh process per case'}, "
        f"operators {'C++' if bnorm.ops.EXTENSION else 'composite (extension not built)'}; "
        f"1-min load average before/after: {load} (other processes skew absolute times; "
        "threads waiting on busy cores skew multi-threaded ones most)"
    )
    print(markdown_table(rows))
    table, missed = goals_table(rows)
    print(f"\nGoals, checked against the numbers above ({missed} missed):\n{table}")
    print("\n" + fold_line(folding))
    args.out.mkdir(parents=True, exist_ok=True)
    # the default run (all cores) is the results file; other thread counts are named apart
    threads = torch.get_num_threads()
    suffix = "" if threads == os.cpu_count() else f"-{threads}thread"
    path = args.out / f"{machine_kind()}-torch{version}{suffix}.csv"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    fold_fields = ["fold_model_ms", "fold_folded_ms", "fold_speedup", "fold_max_rel_error"]
    meta = {
        "machine": machine_kind(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reps": reps,
        "operators": "cpp" if bnorm.ops.EXTENSION else "composite",
        "load_before_after": load,
    }
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*meta, *fields, *fold_fields])
        writer.writeheader()
        for row in rows:
            writer.writerow(meta | {k: _csv_value(v) for k, v in row.items()})
        writer.writerow(
            meta
            | {"layout": "fold: 3-block conv net, eval", "shape": "8x3x32x32"}
            | {f"fold_{k}": f"{v:.3g}" for k, v in folding.items()}
        )
    print(f"CSV: {path}")
    if not args.case:  # the default (or quick) set: whole models too
        names = ["mlp"] if args.quick else list(bench_models.MODELS)
        model_rows = []
        for name in tqdm(names, desc="end to end", disable=args.no_progress, unit="model"):
            row = bench_models.measure_model(name, min(reps, 15), args.compile, _alternate)
            row |= bench_models.peak_rss_ratio(name, runs=1 if args.quick else 3)
            model_rows.append(row)
        print(
            "\nEnd to end, bnorm.convert(model) over the same model with torch's BatchNorm "
            "(time or memory ratios; below 1: bnorm faster or smaller):"
        )
        print(bench_models.markdown(model_rows))
        models_path = path.with_name(path.stem + "-models.csv")
        with models_path.open("w", newline="") as f:
            names_ = list(dict.fromkeys(k for row in model_rows for k in row))
            writer = csv.DictWriter(f, fieldnames=[*meta, *names_])
            writer.writeheader()
            for row in model_rows:
                writer.writerow(meta | {k: _csv_value(v) for k, v in row.items()})
        print(f"CSV: {models_path}")
    return 0


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # not available on every platform
        return "?"


def _csv_value(v: float | str) -> float | str:
    return round(v, 5) if isinstance(v, float) else v


if __name__ == "__main__":
    _child(sys.argv[1:])
