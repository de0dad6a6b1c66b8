"""The `bnorm` command line: lazy imports, one-line user errors, exit codes."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnorm import cli
from bnorm.cli import main


def _bnorm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnorm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "bench", "lab", "info", "--debug"):
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


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["demo", "--help"], ["bench", "--help"], ["lab", "--help"],
     ["lab", "run", "--help"], ["info", "--help"], ["--version"]],
)  # fmt: skip
def test_help_does_not_import_torch(argv):
    """Regression: `bnorm --help` took seconds because building the parser imported torch."""
    code = textwrap.dedent(
        f"""
        import sys
        from bnorm.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        heavy = sorted(m for m in ("torch", "numpy", "matplotlib", "bnorm.lab.runner")
                       if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_import_bnorm_is_lazy_but_complete():
    """`import bnorm` imports no torch; every public name still resolves on first use."""
    code = textwrap.dedent(
        """
        import sys
        import bnorm
        assert "torch" not in sys.modules, "import bnorm imported torch"
        for name in bnorm.__all__:
            getattr(bnorm, name)
        from bnorm import BatchNorm2d, functional
        assert BatchNorm2d is bnorm.BatchNorm2d and functional is bnorm.functional
        assert "BatchNorm2d" in dir(bnorm)
        print("OK")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OK"


def test_unknown_attribute_is_an_attribute_error():
    import bnorm

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        bnorm.no_such_name  # noqa: B018


# (arguments, words the one-line message must contain); "{tmp}" is the test's folder
USER_ERRORS = [
    (["demo", "--seeds", "0"], ["--seeds", "at least 1"]),
    (["demo", "--epochs", "abc"], ["--epochs", "whole number"]),
    (["demo", "--epochs", "-3"], ["--epochs", "at least 1"]),
    (["demo", "--out", "/proc/forbidden"], ["--out", "/proc/forbidden", "writable folder"]),
    (["demo", "--out", "{tmp}/a-file/sub"], ["--out", "a-file/sub", "writable folder"]),
    (["demo", "--no-such-option"], ["unrecognized arguments", "--no-such-option"]),
    (["bench", "--case", "nchw:abc"], ["--case", "LAYOUT:SHAPE", "nc, ncl, nchw, cl"]),
    (["bench", "--case", "xyz:2x3"], ["--case", "LAYOUT:SHAPE"]),
    (["bench", "--case", "nchw:2x3"], ["--case", "nchw takes 4 sizes"]),
    (["bench", "--case", "nc:0x3"], ["--case", "at least 1"]),
    (["bench", "--reps", "0"], ["--reps", "at least 1"]),
    (["bench", "--threads", "two"], ["--threads", "whole number"]),
    (["bench", "--quick", "--out", "/proc/forbidden"], ["--out", "writable folder"]),
    (["bench", "--results-dir", "{tmp}/a-file"], ["--out", "a-file", "writable folder"]),
    (["nosuchcommand"], ["invalid choice", "demo"]),
]


@pytest.mark.parametrize("argv,words", USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_user_errors_are_one_line_exit_2_before_any_work(argv, words, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv and "--results-dir" not in argv:
        argv += ["--out", str(tmp_path / "out")]  # must stay uncreated: nothing ran
    done = _bnorm(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("bnorm")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert done.stdout == ""  # no training line, no progress bar, no table
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "bnorm-out").exists()


def test_debug_shows_the_traceback(tmp_path):
    done = _bnorm("--debug", "demo", "--out", "/proc/forbidden", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("bnorm demo: error: --out")


def test_unexpected_errors_are_one_line_exit_1(monkeypatch, capfd):
    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "_info", boom)
    assert main(["info"]) == 1
    err = capfd.readouterr().err.splitlines()
    assert err == ["bnorm info: error: something broke (run `bnorm --debug ...` for the traceback)"]
    assert main(["--debug", "info"]) == 1
    assert "Traceback" in capfd.readouterr().err


def test_heavy_commands_build_their_parser_only_when_named(monkeypatch, tmp_path):
    """A command whose module imports torch is listed by `bnorm --help` without importing it."""
    (tmp_path / "bnorm_fake_heavy.py").write_text(
        "def add_parser(sub):\n"
        "    p = sub.add_parser('heavy', help='a heavy command')\n"
        "    p.add_argument('--level', type=int, required=True)\n"
        "    p.set_defaults(func=lambda args: args.level)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "_HEAVY_COMMANDS", [("heavy", "a heavy command", "bnorm_fake_heavy")])
    monkeypatch.delitem(sys.modules, "bnorm_fake_heavy", raising=False)
    assert "heavy" in cli.build_parser(["--help"]).format_help()
    assert "bnorm_fake_heavy" not in sys.modules
    assert main(["heavy", "--level", "7"]) == 7
    assert "bnorm_fake_heavy" in sys.modules


def test_output_dir_is_created_and_checked(tmp_path):
    assert cli.output_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(cli.UsageError, match="--results"):
        cli.output_dir(tmp_path / "f", "--results")
