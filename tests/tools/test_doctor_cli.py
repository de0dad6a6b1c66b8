"""``bnorm doctor`` on the command line, the HTML page (in headless Chromium), JSON, and the
lab's use of the doctor."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from bnorm.cli import main
from bnorm.tools import clinic
from bnorm.tools.doctor import doctor

TARGET = """
import torch
from torch import nn

def good():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU())
    return model, [torch.randn(16, 3) for _ in range(4)]

def with_targets():
    model, batches = good()
    return model, batches, [torch.zeros(16, dtype=torch.long) for _ in batches]

def not_a_tuple():
    return 3

def raises():
    raise RuntimeError("boom")

value = 1
"""


@pytest.fixture
def target(tmp_path, monkeypatch):
    (tmp_path / "doctor_target_mod.py").write_text(textwrap.dedent(TARGET))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:good", "cannot import"),
        ("doctor_target_mod:missing", "has no function 'missing'"),
        ("doctor_target_mod:value", "has no function 'value'"),
        ("doctor_target_mod:not_a_tuple", "must return (model, batches)"),
        ("doctor_target_mod:raises", "raised RuntimeError: boom"),
        ("doctor_target_mod", "expected MODULE:FUNCTION"),
        ("missing_file.py:good", "no such file"),
    ],
)
def test_bad_target_is_one_line_exit_2(target, capsys, spec, message):
    assert main(["doctor", spec]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("bnorm doctor: error: ") and message in err


def test_unknown_example_and_no_target(capsys):
    assert main(["doctor", "--example", "nope"]) == 2
    assert "choose from" in capsys.readouterr().err
    assert main(["doctor"]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err


def test_bad_target_no_traceback_in_a_process(target):
    """The installed command: exit code 2 and one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-m", "bnorm", "doctor", "doctor_target_mod:not_a_tuple"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


@pytest.mark.parametrize("spec", ["doctor_target_mod:good", "doctor_target_mod:with_targets"])
def test_target_runs_exit_0_with_findings(target, capsys, spec):
    assert main(["doctor", spec]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out and "fix: bnorm.precise_bn(model, batches)" in out


def test_target_as_a_file_path(target, capsys):
    assert main(["doctor", f"{target / 'doctor_target_mod.py'}:good"]) == 0
    assert "untrained" in capsys.readouterr().out


def test_example_writes_json_and_html_with_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code = main(
            [
                "doctor",
                "--example",
                "partial-eval",
                "--apply",
                "--json",
                str(tmp_path / "d.json"),
                "--html",
                str(tmp_path / "d.html"),
            ]
        )
    finally:
        os.umask(old)
    assert code == 0
    out = capsys.readouterr().out
    assert "train-mode-in-eval" in out and "cured: train-mode-in-eval" in out
    data = json.loads((tmp_path / "d.json").read_text())
    assert [f["rule"] for f in data["findings"]] == ["train-mode-in-eval"]
    for name in ("d.json", "d.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("BNORM_REQUIRE_CHROMIUM") == "1":
        pytest.fail("BNORM_REQUIRE_CHROMIUM=1 but no chromium on PATH")
    return found


@pytest.mark.parametrize("name", ["unshuffled", "healthy"])
def test_html_renders_every_chart_in_headless_chromium(tmp_path, name):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    model, batches, _ = clinic.example(name)
    diagnosis = doctor(model, batches, name=name)
    page = diagnosis.to_html(tmp_path / "doctor.html")
    run = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    total = len(diagnosis.layers)
    assert f'data-charts-total="{total}"' in dom and f'data-charts-rendered="{total}"' in dom
    if diagnosis.findings:
        assert 'id="findings"' in dom and "non-iid" in dom
    else:
        assert "No findings" in dom


def test_html_and_json_hold_nan_safely(tmp_path):
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_var[0] = float("inf")
    diagnosis = doctor(nn.Sequential(bn), [torch.randn(8, 3) for _ in range(2)])
    text = diagnosis.to_json(tmp_path / "x.json")
    assert json.loads(text)["layers"][0]["running_var"][0] is None
    assert "<svg" in diagnosis.to_html(tmp_path / "x.html").read_text()


def test_lab_train_vs_inference_uses_the_doctor():
    """Two-class batches are what the doctor calls non-i.i.d.; i.i.d. batches are not (on the
    clinic's digits, which load faster than the experiment's MNIST)."""
    from bnorm.lab.data import Dataset
    from bnorm.lab.experiments.train_vs_inference import doctor_rules, two_class_batches
    from bnorm.lab.models import mlp, seeded

    d = clinic.digits()
    data = Dataset("digits", d.x_train, d.y_train, d.x_test, d.y_test, 10)
    model = seeded(0, lambda: mlp([64, 20, 10], bn=True)).eval()
    cfg = {"batch_size": 60}
    assert "non-iid" in doctor_rules(model, data, two_class_batches(data.y_train, 60), cfg)
    assert "non-iid" not in doctor_rules(model, data, None, cfg)
