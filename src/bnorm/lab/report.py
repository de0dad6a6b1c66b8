"""``report.html``: one self-contained page (plots embedded) with every claim and its evidence.

The page opens with the claims table — the claim quoted from the article, the experiment, the
numbers of this run, the verdict — then a section per experiment with its setup, the verdict
rule, a table of numbers and the plots. Plots are embedded as base64 PNG ``data:`` URIs so the
file can be mailed or archived alone. A small inline script records, once the page has loaded,
how many images decoded (``data-images-loaded`` / ``data-images-total`` on ``<body>``) so a
headless browser test can check the page really renders every plot.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .experiment import JSON
from .runner import read_json, write_text_atomic

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
.verdict { font-weight: 600; white-space: nowrap; padding: 0.1em 0.5em; border-radius: 0.3em; }
.supported { background: #d8f0d8; } .not-supported { background: #f6d6d6; }
.mixed { background: #f6ecc8; }
blockquote { margin: 0.5em 0; padding-left: 1em; border-left: 3px solid #bbb; color: #444; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
.meta { color: #555; font-size: 0.9em; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok += 1; } });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
});
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _verdict(v: str) -> str:
    return f'<span class="verdict {v.replace(" ", "-")}">{_e(v)}</span>'


def _table(rows: list[JSON]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def render(out: Path, records: list[JSON], manifest: JSON) -> str:
    """The HTML text of the report for ``records`` (summary.json contents) in ``out``."""
    kind = "quick (CI-sized) run" if manifest.get("quick") else "full run"
    meta = (
        f"{kind}; {_e(manifest.get('machine', '?'))}; torch {_e(manifest.get('torch', '?'))}; "
        f"bnorm {_e(manifest.get('bnorm', '?'))}; torch threads "
        f"{_e(manifest.get('torch_threads', '?'))}; processes {_e(manifest.get('world_size', 1))}; "
        f"started {_e(manifest.get('started', '?'))}"
    )
    claims = "".join(
        f"<tr><td><blockquote>{_e(r['claim'])}</blockquote></td>"
        f'<td><a href="#{_e(r["name"])}">{_e(r["name"])}</a></td>'
        f"<td>{_e(r['headline'])}</td><td>{_verdict(r['verdict'])}</td></tr>"
        for r in records
    )
    sections = []
    for r in records:
        plots = "".join(_img(out / r["name"] / p, f"{r['name']}: {p}") for p in r["plots"])
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        sections.append(
            f'<section id="{_e(r["name"])}"><h2>{_e(r["title"])} '
            f"<small>(<code>{_e(r['name'])}</code>)</small></h2>"
            f"<blockquote>{_e(r['claim'])}</blockquote>"
            f"<p><b>Verdict:</b> {_verdict(r['verdict'])} — {_e(r['headline'])}</p>"
            f"<p><b>Rule:</b> {_e(r['rule'])}</p>"
            f"<p><b>Setup:</b> {_e(r['setup'])}</p>"
            f'<p class="meta">config: {_e(config)}; seeds: {r["seeds"]}; '
            f"{r['seconds']:.0f} s of training</p>"
            f"{_table(r['rows'])}{plots}</section>"
        )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>bnorm lab report</title>"
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        "<h1>bnorm lab: the article's claims, measured</h1>"
        f'<p class="meta">{meta}</p>'
        "<p>Each verdict is computed from this run's numbers by the rule shown in the "
        "experiment's section; medians over seeds, spreads as [min–max].</p>"
        '<table id="claims"><tr><th>claim (quoted from the article)</th><th>experiment</th>'
        f"<th>numbers</th><th>verdict</th></tr>{claims}</table>"
        + "".join(sections)
        + "</body></html>"
    )


def write_report(out: Path, records: list[JSON] | None = None) -> Path:
    """Write ``out/report.html`` from the experiments' ``summary.json`` files; return its path."""
    from .experiments import all_experiments

    out = Path(out)
    manifest = read_json(out / "lab.json")
    if records is None:
        records = [
            read_json(out / e.name / "summary.json")
            for e in all_experiments()
            if (out / e.name / "summary.json").exists()
        ]
    path = out / "report.html"
    write_text_atomic(path, render(out, records, manifest))
    return path
