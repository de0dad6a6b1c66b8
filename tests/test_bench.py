"""`bnorm bench` runs end to end on tiny cases and writes its table and CSV (nothing is timed
here: the numbers are only checked to be well-formed)."""

import argparse
import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bnorm
from bnorm import bench, cli
from bnorm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_table_and_csv(tmp_path, capsys):
    args = ["bench", "--case", "nc:8x3", "--case", "cl:2x3x4x4", "--reps", "2"]
    assert main([*args, "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| N,C | 8x3 |" in out and "| channels_last | 2x3x4x4 |" in out
    assert "bnorm.fold" in out
    assert "Goals, checked against the numbers above" in out
    assert "| tiny tensors: training never slower than torch | N,C 8x3 |" in out
    files = list(tmp_path.glob("*.csv"))
    assert len(files) == 1
    assert files[0].name.startswith(f"{bench.machine_kind()}-torch{_torch_version()}")
    with files[0].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["shape"] for r in rows] == ["8x3", "2x3x4x4", "8x3x32x32"]
    assert {r["cpu"] for r in rows} == {bench.cpu_model()}
    assert {r["operators"] for r in rows} == {"cpp" if bnorm.ops.EXTENSION else "composite"}
    for row in rows[:2]:
        for key in (
            "train_torch_over_bnorm",
            "train_bnorm_over_cold_copy",
            "eval_bnorm_over_clone",
        ):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (key, row[key])
    assert float(rows[2]["fold_max_rel_error"]) < 1e-5


def test_machine_kind_names_the_processor_vendor(monkeypatch, tmp_path):
    """Results files of one machine kind are told apart by vendor (Intel and AMD machines of
    the same kind measure different ratios): read from /proc/cpuinfo, omitted where absent."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n")
    monkeypatch.setattr(bench, "CPUINFO", info)
    assert bench.machine_kind().endswith("core-amd")
    assert bench.cpu_model() == "AMD EPYC 9R14"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert bench.machine_kind().endswith("core-intel")
    info.unlink()  # no /proc/cpuinfo (not Linux): the kind without a vendor
    assert bench.machine_kind().endswith("core")


def _torch_version():
    import torch

    return torch.__version__.split("+")[0]


@pytest.mark.parametrize("text", ["nchw:2x3", "xyz:2x3", "nc", "nc:0x3", "nchw:abc", "cl:2x3x4"])
def test_bad_case_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_case(text)


def test_case_text_reads_back():
    for case in bench.DEFAULT_CASES:
        assert bench.Case(*cli.parse_case(bench._case_text(case))) == case


@pytest.mark.parametrize("speedup,word", [(1.25, "1.25× faster"), (0.8, "1.25× slower")])
def test_fold_line_says_slower_when_slower(speedup, word):
    """Regression: a slower folded model was reported as "(1.07× faster)"."""
    line = bench.fold_line(
        {"model_ms": 1.0, "folded_ms": 1.0 / speedup, "speedup": speedup, "max_rel_error": 0.0}
    )
    assert f"**{word}**" in line


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_quick_bench_leaves_the_clone_clean(tmp_path):
    """Regression: `bnorm bench --quick` from the repository root overwrote the tracked
    benchmarks/results/*.csv. Run in a fresh clone, it must leave `git status` clean and put its
    CSV under bnorm-out/bench/."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--local", str(ROOT), str(clone)], check=True)
    done = subprocess.run(
        [sys.executable, "-m", "bnorm", "bench", "--quick", "--reps", "1", "--one-process",
         "--no-progress"],
        cwd=clone, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=clone, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert status.stdout == ""
    written = sorted((clone / "bnorm-out" / "bench").glob("*.csv"))
    assert sorted(p.name.endswith("-models.csv") for p in written) == [False, True]
    assert all(str(p.relative_to(clone)) in done.stdout for p in written)
    assert "| mlp | 256x1024 |" in done.stdout  # the quick set's end-to-end section


def test_quick_cases_are_a_subset_in_size():
    assert max(c.megabytes for c in bench.QUICK_CASES) < 32
    assert {c.layout for c in bench.DEFAULT_CASES} == {"N,C", "N,C,L", "NCHW", "channels_last"}


def _row(layout, mb, **values):
    row = {"layout": layout, "shape": "s", "MB": mb}
    row.update(values)
    return row


def test_goals_are_decided_by_the_numbers_at_their_bounds():
    rows = [
        _row("NCHW", 12.0, train_torch_over_bnorm=2.0, train_bnorm_over_cold_copy=5.0,
             eval_bnorm_over_clone=1.5),
        _row("NCHW", 6.0, train_torch_over_bnorm=1.99, train_bnorm_over_cold_copy=5.01,
             eval_bnorm_over_clone=1.51),
        _row("N,C", 8.0, train_torch_over_bnorm=1.5, train_bnorm_over_cold_copy=1.0,
             eval_bnorm_over_clone=1.0),
        _row("N,C", 64.0, train_torch_over_bnorm=1.29, train_bnorm_over_cold_copy=9.0,
             eval_bnorm_over_clone=9.0),
        _row("N,C", 0.01, train_torch_over_bnorm=1.0, eval_torch_over_bnorm=0.99,
             train_bnorm_over_cold_copy=99.0, eval_bnorm_over_clone=99.0),
    ]  # fmt: skip
    table, missed = bench.goals_table(rows)
    lines = [line for line in table.splitlines() if line.startswith("| training") or
             line.startswith("| evaluation") or line.startswith("| tiny")]  # fmt: skip
    met = {line.rsplit("|", 2)[-2].strip() for line in lines}
    assert met == {"yes", "**no**"}
    # 6 MB NCHW misses three goals, 64 MB two (1.3x, and evaluation), tiny evaluation one
    assert missed == 6
    # a goal applies only in its size range: only the 1-32 MB cases face the cold-copy bound
    assert sum("cold-cache copy" in line for line in lines) == 3
