"""`bnorm lab run all --quick` end to end, its report.html, and the report in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bnorm.cli import main
from bnorm.lab.experiment import VERDICTS
from bnorm.lab.experiments import MODULES, all_experiments

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """One quick run of all ten experiments, shared by the tests of this file."""
    out = tmp_path_factory.mktemp("lab")
    assert main(["lab", "run", "all", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_run_writes_every_experiment(quick_run):
    names = [e.name for e in all_experiments()]
    assert len(names) == len(MODULES) == 10
    for name in names:
        summary = json.loads((quick_run / name / "summary.json").read_text())
        assert summary["verdict"] in VERDICTS
        assert summary["quick"] is True and summary["seeds"] >= 2
        assert summary["seeds"] <= summary["max_seeds"]
        assert summary["checks"], f"{name} decided from no check"
        for check in summary["checks"]:
            assert len(check["values"]) == summary["seeds"]
        assert summary["headline"] and summary["rule"] and summary["claim"]
        assert summary["plots"], f"{name} made no plot"
        for plot in summary["plots"]:
            assert (quick_run / name / plot).read_bytes()[:4] == b"\x89PNG"


def test_report_has_ten_claims_and_every_plot(quick_run):
    html = (quick_run / "report.html").read_text()
    claims = html.split('<table id="claims">')[1].split("</table>")[0]
    rows = claims.split("<tr>")[2:]  # after the header row
    assert len(rows) == 10
    for row in rows:
        verdict = re.search(r'<td><span class="verdict [a-z-]+">([a-z ]+)</span></td>', row)
        assert verdict and verdict.group(1) in VERDICTS
    plots = sum(
        len(json.loads((quick_run / e.name / "summary.json").read_text())["plots"])
        for e in all_experiments()
    )
    assert html.count('<img alt="') == plots
    assert html.count('src="data:image/png;base64,') == plots


def test_report_numbers_read_back_from_its_json(quick_run):
    """The claims table shows each experiment's verdict and every check's interval exactly as
    its summary.json gives them, and links to its section."""
    from bnorm.lab.verdict import interval_text_json

    html = (quick_run / "report.html").read_text()
    claims = html.split('<table id="claims">')[1].split("</table>")[0]
    rows = claims.split("<tr>")[2:]
    for e, row in zip(all_experiments(), rows, strict=True):
        summary = json.loads((quick_run / e.name / "summary.json").read_text())
        assert f'href="#{e.name}"' in row
        assert f'<span class="verdict {summary["verdict"].replace(" ", "-")}">' in row
        for check in summary["checks"]:
            assert html.count(interval_text_json(check)) >= 2  # table and section agree
            assert interval_text_json(check) in row


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium_args(tmp_path: Path) -> list[str]:
    # The flags the machines here need: no sandbox (root in a container), no GPU, and nothing
    # that would try to reach the network; a fresh profile so no earlier state leaks in.
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]


def test_report_renders_every_plot_in_headless_chromium(quick_run, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("BNORM_REQUIRE_CHROMIUM") == "1":
            pytest.fail("BNORM_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt install chromium)")
        pytest.skip("chromium is not installed (CI installs it and sets BNORM_REQUIRE_CHROMIUM=1)")
    url = (quick_run / "report.html").as_uri()
    dom = subprocess.run(
        [browser, *_chromium_args(tmp_path), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "chromium returned no page"
    total = re.search(r'data-images-total="(\d+)"', body.group(1))
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(1))
    assert total and loaded, "the page's load script did not run"
    expected = (quick_run / "report.html").read_text().count('<img alt="')
    assert int(total.group(1)) == expected > 0
    assert int(loaded.group(1)) == expected, "some plots did not decode in the browser"
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *_chromium_args(tmp_path), f"--screenshot={shot}", "--window-size=1200,900", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
