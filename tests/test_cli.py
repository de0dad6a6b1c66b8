"""The `bnorm` command line."""

import subprocess
import sys

import pytest

from bnorm.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "info"):
        assert command in text


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: bnorm" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "torch_ops" in text
    pools = ("kernels on torch's OpenMP pool", "kernels on numba's pool")
    assert any(pool in text for pool in pools)


@pytest.mark.parametrize("run_bytes,state", [(1 << 20, "on"), (0, "off, the two-pass loops run")])
def test_info_says_whether_the_training_passes_take_channel_blocks(
    run_bytes, state, capsys, monkeypatch
):
    from bnorm.kernels import numba_cpu

    monkeypatch.setattr(numba_cpu, "RUN_BLOCK_BYTES", run_bytes)
    assert main(["info"]) == 0
    assert f"channel blocks of the training passes: {state}" in capsys.readouterr().out


def test_info_says_whether_evaluation_has_its_compiled_entry(capsys):
    from bnorm.kernels import cxx_eval

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    status = cxx_eval.status()  # info waited for it
    assert f"compiled evaluation entry: {status} (BNORM_CXX_EVAL=0 switches it off)" in text
    assert (f"cached at {cxx_eval.cache_path()}" in text) == (status == "ready")


def test_console_script_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "bnorm", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("bnorm ")
