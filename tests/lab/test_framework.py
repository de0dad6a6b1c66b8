"""The lab's framework: atomic writes, resume, verdict plumbing, report, CLI."""

from __future__ import annotations

import base64
import json
import re
import sys
import types
from pathlib import Path

import pytest

from bnorm.cli import main
from bnorm.lab import experiments as registry
from bnorm.lab import runner
from bnorm.lab.experiment import Experiment, Summary, spread
from bnorm.lab.plots import band_plot
from bnorm.lab.report import write_report

CALLS: list[tuple[int, bool]] = []


def _fake_experiment(name: str = "fake") -> Experiment:
    def config(quick: bool) -> dict:
        return {"quick": quick, "steps": 3 if quick else 5}

    def run(seed: int, cfg: dict) -> dict:
        CALLS.append((seed, cfg["quick"]))
        return {"score": seed + cfg["steps"], "curve": [seed, seed + 1, None]}

    def summarize(results, cfg) -> Summary:
        best = max(r["score"] for r in results)
        return Summary({"best": best}, f"best {best}", [{"seed": i} for i in range(len(results))])

    def decide(numbers) -> str:
        return "supported" if numbers["best"] > 5 else "mixed"

    def plot(results, cfg, directory: Path) -> list[str]:
        curves = {"a": [r["curve"] for r in results]}
        return [
            band_plot(
                directory / f"{name}.png", [1, 2, 3], curves, title="t", xlabel="x", ylabel="y"
            )
        ]

    return Experiment(
        name=name,
        title="A fake",
        claim="Fake <claim> & quote",
        setup="none",
        rule="supported if best > 5",
        config=config,
        run=run,
        summarize=summarize,
        decide=decide,
        plot=plot,
        seeds=(2, 3),
    )


@pytest.fixture
def fake_registry(monkeypatch):
    """Replace the experiment registry by two fake experiments."""
    for name in ("fake", "fake2"):
        module = types.ModuleType(f"{registry.__name__}.{name}")
        module.EXPERIMENT = _fake_experiment(name)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "MODULES", ("fake", "fake2"))
    CALLS.clear()
    return registry


def test_write_json_atomic_keeps_old_content_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    runner.write_json_atomic(path, {"v": 1})

    def boom(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(runner.os, "replace", boom)
    with pytest.raises(OSError):
        runner.write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_write_json_atomic_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        runner.write_json_atomic(tmp_path / "a.json", {"v": float("nan")})
    assert not (tmp_path / "a.json").exists()


def test_run_resumes_and_recomputes_on_config_change(fake_registry, tmp_path):
    runner.run_lab(["all"], quick=True, out=tmp_path, progress=False)
    assert sorted(CALLS) == [(0, True), (0, True), (1, True), (1, True)]
    CALLS.clear()
    runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    assert CALLS == []  # everything was already there: resumed
    (tmp_path / "fake" / "seed-1.json").unlink()  # as if interrupted during seed 1
    runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    assert CALLS == [(1, True)]
    CALLS.clear()
    runner.run_lab(["fake"], quick=False, out=tmp_path, progress=False)
    assert CALLS == [(0, False), (1, False), (2, False)]  # full config: recomputed, 3 seeds


def test_summary_and_verdict_come_from_the_numbers(fake_registry, tmp_path):
    records = runner.run_lab(["fake"], quick=True, seeds=1, out=tmp_path, progress=False)
    assert records[0]["numbers"] == {"best": 3} and records[0]["verdict"] == "mixed"
    records = runner.run_lab(["fake"], quick=False, seeds=2, out=tmp_path, progress=False)
    assert records[0]["numbers"] == {"best": 6} and records[0]["verdict"] == "supported"
    saved = json.loads((tmp_path / "fake" / "summary.json").read_text())
    assert saved["verdict"] == "supported" and saved["seeds"] == 2


def test_bad_verdict_is_refused(fake_registry, tmp_path, monkeypatch):
    exp = fake_registry.get("fake")
    monkeypatch.setattr(
        sys.modules[f"{registry.__name__}.fake"],
        "EXPERIMENT",
        Experiment(**{**exp.__dict__, "decide": lambda n: "probably"}),
    )
    with pytest.raises(ValueError, match="probably"):
        runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)


def test_report_is_self_contained_with_claims_table(fake_registry, tmp_path):
    runner.run_lab(["all"], quick=True, out=tmp_path, progress=False)
    html = (tmp_path / "report.html").read_text()
    claims = html.split('<table id="claims">')[1].split("</table>")[0]
    assert claims.count("<tr>") == 3  # header + two experiments
    assert "Fake &lt;claim&gt; &amp; quote" in html  # escaped
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2 == html.count("<img")
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="http' not in html and 'href="http' not in html  # nothing fetched


def test_report_command_recomputes_from_seed_files(fake_registry, tmp_path, capsys):
    runner.run_lab(["all"], quick=True, out=tmp_path, progress=False)
    (tmp_path / "report.html").unlink()
    (tmp_path / "fake" / "summary.json").unlink()
    assert main(["lab", "report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / "fake" / "summary.json").exists()
    assert "report.html" in capsys.readouterr().out
    (tmp_path / "fake2" / "seed-0.json").unlink()
    assert main(["lab", "report", str(tmp_path)]) != 0  # bnorm.cli: one line, no traceback
    assert "fake2" in capsys.readouterr().err


def test_cli_list_and_unknown_name(fake_registry, capsys):
    assert main(["lab", "list"]) == 0
    assert "fake2" in capsys.readouterr().out
    assert main(["lab", "run", "nope", "--quick"]) != 0  # bnorm.cli: one line, no traceback
    assert "choose one of: fake, fake2" in capsys.readouterr().err


def test_spread_counts_missing_runs():
    assert spread([1.0, None, 3.0], "{:.0f}") == "2 [1–3] (1 of 3 never)"
    assert spread([None, None]) == "never (2 of 2)"
    assert spread([]) == "–"


def test_write_report_without_summaries_still_writes_page(fake_registry, tmp_path):
    runner.write_json_atomic(tmp_path / "lab.json", {"quick": True})
    assert "claims" in write_report(tmp_path).read_text()
