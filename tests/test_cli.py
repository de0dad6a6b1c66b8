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


def test_info(capsys, monkeypatch):
    import bnorm

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "operators: C++ extension" in text
    monkeypatch.setattr(bnorm.ops, "EXTENSION", False)
    assert main(["info"]) == 0
    assert "operators: composite path" in capsys.readouterr().out


def test_console_script_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "bnorm", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("bnorm ")
