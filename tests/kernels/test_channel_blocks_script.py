"""``benchmarks/channel_blocks.py``, the measurement behind the per-processor choice of channel
blocks (``numba_cpu.RUN_BLOCK_BYTES``): it runs on a tiny case, prints its table, and leaves the
setting as it found it (nothing is timed here: the numbers are only checked to be well-formed)."""

import importlib.util
import math
from pathlib import Path

import pytest

numba_cpu = pytest.importorskip("bnorm.kernels.numba_cpu")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "channel_blocks.py"


def _script():
    spec = importlib.util.spec_from_file_location("channel_blocks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("default", [0, 1 << 20])
def test_channel_blocks_script_measures_both_and_restores_the_setting(default, capsys, monkeypatch):
    monkeypatch.setattr(numba_cpu, "RUN_BLOCK_BYTES", default)
    script = _script()
    row = script.measure((4, 8, 40), rounds=2)
    assert numba_cpu.RUN_BLOCK_BYTES == default
    for key in ("blocks_ms", "two_pass_ms", "torch_ms", "two_pass_over_blocks"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    script.main(["--shape", "4x8x40", "--shape", "2x8x6x6", "--rounds", "2"])
    out = capsys.readouterr().out
    assert f"channel blocks are {'on' if default else 'off'} by default here" in out
    assert "| 4x8x40 |" in out and "| 2x8x6x6 |" in out
    assert numba_cpu.RUN_BLOCK_BYTES == default
