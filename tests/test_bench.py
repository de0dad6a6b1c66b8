"""`bnorm bench` runs end to end on tiny cases and writes its table and CSV (nothing is timed
here: the numbers are only checked to be well-formed)."""

import argparse
import csv
import math

import pytest

from bnorm import bench
from bnorm.cli import main


def test_bench_writes_table_and_csv(tmp_path, capsys):
    args = ["bench", "--case", "nc:8x3", "--case", "cl:2x3x4x4", "--reps", "2"]
    assert main([*args, "--results-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| N,C | 8x3 |" in out and "| channels_last | 2x3x4x4 |" in out
    assert "bnorm.fold" in out
    files = list(tmp_path.glob("*.csv"))
    assert len(files) == 1
    assert files[0].name.startswith(f"{bench.machine_kind()}-torch{_torch_version()}")
    with files[0].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["shape"] for r in rows] == ["8x3", "2x3x4x4", "8x3x32x32"]
    for row in rows[:2]:
        for key in ("train_torch_over_bnorm", "train_bnorm_over_copy", "eval_bnorm_over_clone"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (key, row[key])
    assert float(rows[2]["fold_max_rel_error"]) < 1e-5


def _torch_version():
    import torch

    return torch.__version__.split("+")[0]


@pytest.mark.parametrize("text", ["nchw:2x3", "xyz:2x3", "nc", "nc:0x3"])
def test_bad_case_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench._parse_case(text)


def test_quick_cases_are_a_subset_in_size():
    assert max(c.megabytes for c in bench.QUICK_CASES) < 32
    assert {c.layout for c in bench.DEFAULT_CASES} == {"N,C", "N,C,L", "NCHW", "channels_last"}
