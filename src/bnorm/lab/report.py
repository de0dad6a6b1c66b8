"""``report.html``: one self-contained page (plots embedded) with every claim and its evidence.

The page opens with a "how to read this" paragraph and the claims table — the claim quoted from
the article, a link to its section, the verdict, the checks it was decided from (mean of the
per-seed paired values with its 95% interval, against the rule's margin) and the seeds used —
then a section per experiment with its setup, the rule, the same checks, a table of numbers
and the plots. Every judged number is printed from the decision's checks, so the claims table
and the section show one value for it. Plots are embedded as base64 PNG ``data:`` URIs so the
file can be mailed or archived alone. A small inline script records, once the page has loaded,
how many images decoded (``data-images-loaded`` / ``data-images-total`` on ``<body>``) so a
headless browser test can check the page really renders every plot.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .experiment import JSON
from .runner import CorruptFile, read_json, set_aside, write_text_atomic
from .verdict import interval_text_json

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
.verdict { font-weight: 600; white-space: nowrap; padding: 0.1em 0.5em; border-radius: 0.3em; }
.supported { background: #d8f0d8; } .not-supported { background: #f6d6d6; }
.inconclusive { background: #f6ecc8; }
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


def _text(text: object) -> str:
    """Escaped text with `spans in backticks` shown as code (no literal Markdown)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _checks(checks: list[JSON]) -> str:
    """The checks as list items: what, mean [95% interval], the margin, the check's verdict."""
    items = []
    for c in checks:
        sign = ">" if c["side"] == "above" else "<"
        margin = c.get("fmt", "{:+.3f}").format(c["margin"])
        items.append(
            f"<li>{_e(c['label'])}: <b>{_e(interval_text_json(c))}</b> "
            f"(claim needs {_e(sign)} {_e(margin)}; {len(c['values'])} seeds) → "
            f"{_verdict(c['verdict'])}</li>"
        )
    return f"<ul class='checks'>{''.join(items)}</ul>"


def _seeds(r: JSON) -> str:
    seeds = r.get("seed_list") or list(range(r["seeds"]))
    text = ", ".join(map(str, seeds))
    cap = r.get("max_seeds")
    return f"{len(seeds)} ({text})" + (f", at most {cap}" if cap else "")


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


_HOW_TO_READ = (
    '<div id="how-to-read"><h2>How to read this</h2><p>Each claim is decided by the rule in '
    "its section, from this run's numbers. Both arms of a comparison are trained from the same "
    "seed on the same batches, so each seed gives one <i>paired</i> value (a difference or a "
    "ratio). A check shows the mean of those values and its 95% confidence interval "
    "(Student-t over the seeds: mean ± t·s/√n): the range of true means these seeds are "
    "compatible with. The claim needs the mean beyond a <i>margin</i> (e.g. at least 2 points "
    "of accuracy). A check is <b>supported</b> when its whole interval lies beyond the margin, "
    "<b>not supported</b> when its whole interval lies on the other side, and "
    "<b>inconclusive</b> when the interval contains the margin — these seeds cannot tell, "
    "and more seeds, not a different reading, would decide. Fewer than three seeds never "
    "decide (two seeds can agree by coincidence and give a zero-width interval). A claim "
    "with several checks is supported when all are, not supported when any is not. An "
    "inconclusive experiment gets more seeds, up to its stated maximum and the run's time "
    "budget. Tables below give medians over seeds with [min–max].</p></div>"
)


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
        f"<td>{_verdict(r['verdict'])}</td><td>{_checks(r['checks'])}</td>"
        f"<td>{_e(_seeds(r))}</td></tr>"
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
            f"<p><b>Verdict:</b> {_verdict(r['verdict'])}</p>{_checks(r['checks'])}"
            f"<p><b>Rule:</b> {_text(r['rule'])}</p>"
            f"<p><b>Setup:</b> {_text(r['setup'])}</p>"
            f"<p><b>Also measured:</b> {_text(r['headline'])}</p>"
            f'<p class="meta">config: {_e(config)}; seeds: {_e(_seeds(r))}; '
            f"{r['seconds']:.0f} s of training</p>"
            f"{_table(r['rows'])}"
            + "".join(f"<p>{_text(n)}</p>" for n in r.get("notes", []))
            + f"{plots}</section>"
        )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>bnorm lab report</title>"
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        "<h1>bnorm lab: the article's claims, measured</h1>"
        f'<p class="meta">{meta}</p>'
        f"{_HOW_TO_READ}"
        '<table id="claims"><tr><th>claim (quoted from the article)</th><th>experiment</th>'
        f"<th>verdict</th><th>checks: mean [95% interval]</th><th>seeds</th></tr>{claims}"
        "</table>" + "".join(sections) + "</body></html>"
    )


def write_report(out: Path, records: list[JSON] | None = None) -> Path:
    """Write ``out/report.html`` from the experiments' ``summary.json`` files; return its path."""
    from .experiments import all_experiments

    out = Path(out)
    manifest = read_json(out / "lab.json")
    if records is None:
        records = []
        for e in all_experiments():
            path = out / e.name / "summary.json"
            if not path.exists():
                continue
            try:
                record = read_json(path)
                if not isinstance(record, dict) or "checks" not in record:
                    raise CorruptFile(f"{path}: not a summary of this version of the lab")
            except CorruptFile as err:
                set_aside(path, str(err), f"leaving {e.name} out (bnorm lab report rebuilds it)")
                continue
            records.append(record)
    path = out / "report.html"
    write_text_atomic(path, render(out, records, manifest))
    return path
