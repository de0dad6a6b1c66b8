"""The lab's framework: atomic writes, resume, adaptive seeds, damaged files, report, CLI."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import sys
import types
from pathlib import Path

import pytest

from bnorm.cli import main
from bnorm.lab import experiments as registry
from bnorm.lab import runner
from bnorm.lab.experiment import Experiment, Summary, check, spread
from bnorm.lab.plots import band_plot
from bnorm.lab.report import write_report

CALLS: list[tuple[int, bool]] = []


def _fake_experiment(name: str = "fake", margin: float = -100.0) -> Experiment:
    """Per seed k the paired value is k + steps (quick: 3, full: 5); the claim needs it above
    ``margin``; the default margin is far below every interval, so the first seeds decide."""

    def config(quick: bool) -> dict:
        return {"quick": quick, "steps": 3 if quick else 5}

    def run(seed: int, cfg: dict) -> dict:
        CALLS.append((seed, cfg["quick"]))
        return {"score": seed + cfg["steps"], "curve": [seed, seed + 1, None]}

    def summarize(results, cfg) -> Summary:
        best = max(r["score"] for r in results)
        numbers = {"best": best, "per_seed": {"score": [r["score"] for r in results]}}
        return Summary(numbers, f"best `{best}`", [{"seed": i} for i in range(len(results))])

    def decide(numbers):
        return check("score", numbers["per_seed"]["score"], margin, "above").decision()

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
        seeds=(3, 4),
        max_seeds=(5, 6),
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
    assert sorted(CALLS) == sorted([(0, True), (1, True), (2, True)] * 2)
    CALLS.clear()
    runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    assert CALLS == []  # everything was already there: resumed
    (tmp_path / "fake" / "seed-1.json").unlink()  # as if interrupted during seed 1
    runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    assert CALLS == [(1, True)]
    CALLS.clear()
    runner.run_lab(["fake"], quick=False, out=tmp_path, progress=False)
    assert CALLS == [(s, False) for s in range(4)]  # full config: recomputed, 4 seeds


def test_summary_and_verdict_come_from_the_numbers(fake_registry, tmp_path):
    records = runner.run_lab(["fake"], quick=True, seeds=3, out=tmp_path, progress=False)
    assert records[0]["numbers"]["per_seed"]["score"] == [3, 4, 5]
    assert records[0]["verdict"] == "supported"
    (check_json,) = records[0]["checks"]
    assert check_json["mean"] == 4 and check_json["values"] == [3, 4, 5]
    saved = json.loads((tmp_path / "fake" / "summary.json").read_text())
    assert saved["verdict"] == "supported" and saved["seed_list"] == [0, 1, 2]


def _set_margin(monkeypatch, registry_, name: str, margin: float) -> None:
    monkeypatch.setattr(
        sys.modules[f"{registry_.__name__}.{name}"], "EXPERIMENT", _fake_experiment(name, margin)
    )


def test_seeds_are_added_until_the_maximum_while_inconclusive(fake_registry, tmp_path, monkeypatch):
    """Adding seeds stops at the experiment's maximum when the verdict never decides."""
    # Scores 3, 4, 5, …: a margin of 5 stays inside the interval of the first 5 seeds.
    _set_margin(monkeypatch, fake_registry, "fake", 5.0)
    records = runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False, budget=1e9)
    assert records[0]["verdict"] == "inconclusive"
    assert records[0]["seed_list"] == [0, 1, 2, 3, 4]  # max_seeds quick = 5
    assert sorted(s for s, _ in CALLS) == [0, 1, 2, 3, 4]
    manifest = json.loads((tmp_path / "lab.json").read_text())
    assert manifest["experiments"]["fake"]["seeds"] == [0, 1, 2, 3, 4]


def test_seeds_are_not_added_once_decided_or_out_of_budget(fake_registry, tmp_path, monkeypatch):
    records = runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False, budget=1e9)
    assert records[0]["verdict"] == "supported" and records[0]["seeds"] == 3
    _set_margin(monkeypatch, fake_registry, "fake", 5.0)
    CALLS.clear()
    records = runner.run_lab(["fake"], quick=True, out=tmp_path / "b", progress=False, budget=0)
    assert records[0]["verdict"] == "inconclusive" and records[0]["seeds"] == 3
    assert len(CALLS) == 3


def test_first_seed_gives_disjoint_seed_sets(fake_registry, tmp_path):
    records = runner.run_lab(["fake"], quick=True, out=tmp_path, first_seed=1000, progress=False)
    assert records[0]["seed_list"] == [1000, 1001, 1002]
    assert (tmp_path / "fake" / "seed-1000.json").exists()


def test_bad_verdict_is_refused(fake_registry, tmp_path, monkeypatch):
    exp = fake_registry.get("fake")
    monkeypatch.setattr(
        sys.modules[f"{registry.__name__}.fake"],
        "EXPERIMENT",
        Experiment(**{**exp.__dict__, "decide": lambda n: "probably"}),
    )
    with pytest.raises(ValueError, match="probably"):
        runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)


def test_report_shows_checks_seeds_and_how_to_read(fake_registry, tmp_path):
    runner.run_lab(["all"], quick=True, out=tmp_path, progress=False)
    html = (tmp_path / "report.html").read_text()
    claims = html.split('<table id="claims">')[1].split("</table>")[0]
    assert claims.count("<tr>") == 3  # header + two experiments
    assert 'href="#fake"' in claims and 'href="#fake2"' in claims
    assert "How to read this" in html and "inconclusive" in html
    assert "claim needs &gt; -100.000" in html  # the margin, escaped
    assert "Fake &lt;claim&gt; &amp; quote" in html  # escaped
    assert "`" not in html.split("<script>")[0] + html.split("</script>")[1]  # rendered
    assert "<code>5</code>" in html  # the headline's backticks became code
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2 == html.count("<img")
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="http' not in html and 'href="http' not in html  # nothing fetched


def test_report_numbers_read_back_from_its_json(fake_registry, tmp_path):
    """Each judged number appears in the claims table and in its section exactly as
    summary.json gives it, and summary.json's mean is the mean of the seed files' values."""
    from bnorm.lab.verdict import interval_text_json

    runner.run_lab(["all"], quick=True, out=tmp_path, progress=False)
    html = (tmp_path / "report.html").read_text()
    claims = html.split('<table id="claims">')[1].split("</table>")[0]
    for name in ("fake", "fake2"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        seeds = [
            json.loads((tmp_path / name / f"seed-{s}.json").read_text())
            for s in summary["seed_list"]
        ]
        (c,) = summary["checks"]
        assert c["values"] == [r["result"]["score"] for r in seeds]
        assert c["mean"] == pytest.approx(sum(c["values"]) / len(c["values"]))
        text = interval_text_json(c)
        section = html.split(f'<section id="{name}">')[1].split("</section>")[0]
        assert text in section and text in claims


def test_report_command_recomputes_from_seed_files(fake_registry, tmp_path, capsys):
    runner.run_lab(["all"], quick=True, out=tmp_path, progress=False)
    (tmp_path / "report.html").unlink()
    (tmp_path / "fake" / "summary.json").unlink()
    assert main(["lab", "report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / "fake" / "summary.json").exists()
    assert "report.html" in capsys.readouterr().out


def test_files_are_written_with_the_users_umask(fake_registry, tmp_path):
    old = os.umask(0o027)
    try:
        runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    finally:
        os.umask(old)
    for path in (
        tmp_path / "lab.json",
        tmp_path / "report.html",
        tmp_path / "fake" / "seed-0.json",
        tmp_path / "fake" / "summary.json",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe" + path.read_bytes())


def _edit_number(path: Path) -> None:
    record = json.loads(path.read_text())
    record["result"]["score"] += 1  # a hand-edited result: the checksum no longer matches
    path.write_text(json.dumps(record))


def _drop_key(path: Path) -> None:
    record = json.loads(path.read_text())
    del record["result"]
    path.write_text(json.dumps(record))


DAMAGE = {
    "truncated": _truncate,
    "not utf-8": _not_utf8,
    "edited": _edit_number,
    "missing key": _drop_key,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_seed_file_is_named_set_aside_and_recomputed(
    fake_registry, tmp_path, capsys, damage
):
    runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    path = tmp_path / "fake" / "seed-1.json"
    good = json.loads(path.read_text())
    DAMAGE[damage](path)
    CALLS.clear()
    capsys.readouterr()
    runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "seed-1.json.corrupt" in err[0]
    assert CALLS == [(1, True)]  # only the damaged seed was recomputed
    assert path.with_name("seed-1.json.corrupt").exists()
    again = json.loads(path.read_text())
    assert again["result"] == good["result"]
    runner.check_seed_record(again, path, fake_registry.get("fake"), 1)  # intact again


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_report_names_a_damaged_file_and_carries_on(fake_registry, tmp_path, capsys, damage):
    runner.run_lab(["all"], quick=True, out=tmp_path, progress=False)
    path = tmp_path / "fake" / "seed-0.json"
    DAMAGE[damage](path)
    capsys.readouterr()
    assert main(["lab", "report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert str(path) in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "fake2" in captured.out and path.with_name("seed-0.json.corrupt").exists()
    assert 'href="#fake2"' in (tmp_path / "report.html").read_text()
    assert CALLS == [(0, True), (1, True), (2, True)] * 2  # the report trained nothing


def test_damaged_manifest_is_set_aside_by_run(fake_registry, tmp_path, capsys):
    runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    (tmp_path / "lab.json").write_text("{not json")
    capsys.readouterr()
    runner.run_lab(["fake"], quick=True, out=tmp_path, progress=False)
    assert "lab.json" in capsys.readouterr().err
    assert json.loads((tmp_path / "lab.json").read_text())["experiments"]["fake"]
    assert (tmp_path / "lab.json.corrupt").exists()


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["lab", "run", "nosuch", "--quick"], "NAME: no experiment 'nosuch'; choose from fake"),
        (["lab", "run", "all", "--seeds", "0"], "--seeds: 0 is not allowed"),
        (["lab", "run", "all", "--seeds", "x"], "--seeds: 'x' is not an integer"),
        (["lab", "run", "all", "--threads", "0"], "--threads: 0 is not allowed"),
        (["lab", "run", "all", "--budget", "nan"], "--budget: nan is not allowed"),
        (["lab", "run", "all", "--seeds", "4", "--max-seeds", "3"], "--max-seeds: 3 is below"),
        (["lab", "report", "/nonexistent"], "DIR: '/nonexistent' is not a directory"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2_before_training(fake_registry, capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    assert expected in _error_line(capsys)
    assert CALLS == []


def test_cli_unwritable_out_is_refused_before_training(fake_registry, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (str(blocker / "lab"), "/proc/forbidden"):
        assert main(["lab", "run", "all", "--quick", "--out", out]) == 2
        line = _error_line(capsys)
        assert line.startswith("bnorm lab run: error: --out: cannot write to") and out in line
    assert CALLS == []


def test_cli_report_without_manifest(fake_registry, tmp_path, capsys):
    assert main(["lab", "report", str(tmp_path)]) == 2
    assert "has no lab.json" in _error_line(capsys)
    (tmp_path / "lab.json").write_text("\x00garbage")
    assert main(["lab", "report", str(tmp_path)]) == 2
    assert "lab.json" in _error_line(capsys)


def test_cli_debug_lets_the_error_propagate(fake_registry):
    from bnorm.cli import build_parser
    from bnorm.lab.cli import LabUsageError

    args = build_parser().parse_args(["lab", "run", "nosuch"])
    args.debug = True
    with pytest.raises(LabUsageError, match="nosuch"):
        args.func(args)


def test_cli_list(fake_registry, capsys):
    assert main(["lab", "list"]) == 0
    assert "fake2" in capsys.readouterr().out


def test_stability_table_flags_a_flip(fake_registry, tmp_path, monkeypatch):
    """Two runs with disjoint seeds; the table lists both verdicts and intervals per claim and
    marks a claim supported in one run and not supported in the other."""
    # Scores are seed + 3: seeds 0, 1 fall wholly below the margin, seeds 1000, 1001 above.
    _set_margin(monkeypatch, fake_registry, "fake", 100.0)
    text = runner.run_stability(quick=True, out=tmp_path, progress=False, budget=0)
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in text.splitlines()
        if line.startswith("| fake")
    }
    assert set(rows) == {"fake", "fake2"}
    assert "not supported" in rows["fake"] and "**no**" in rows["fake"]
    assert rows["fake2"].endswith("| yes |")
    assert "0–2" in rows["fake"] and "1000–1002" in rows["fake"]
    assert (tmp_path / "stability.md").read_text() == text
    assert "1 of 2" in text
    CALLS.clear()
    again = runner.run_stability(quick=True, out=tmp_path, table_only=True)
    assert CALLS == []  # the table alone trains nothing
    assert [r for r in again.splitlines() if r.startswith("| fake")] == list(rows.values())


def test_spread_counts_missing_runs():
    assert spread([1.0, None, 3.0], "{:.0f}") == "2 [1–3] (1 of 3 never)"
    assert spread([None, None]) == "never (2 of 2)"
    assert spread([]) == "–"


def test_write_report_without_summaries_still_writes_page(fake_registry, tmp_path):
    runner.write_json_atomic(tmp_path / "lab.json", {"quick": True})
    assert "claims" in write_report(tmp_path).read_text()
