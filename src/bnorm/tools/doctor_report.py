"""How a :class:`bnorm.tools.doctor.Diagnosis` is shown: the terminal table, the HTML page (inline
SVG charts drawn here, no plotting dependency), and the ``bnorm doctor`` command."""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .doctor import Diagnosis, LayerReport, Treatment


# --- terminal ---------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v[:6]) + (",…]" if len(v) > 6 else "]")
    return str(v)


def _numbers(numbers: dict[str, Any], limit: int = 4) -> str:
    keys = [k for k in numbers if not k.startswith(("accuracy_", "loss_", "output_"))]
    return " ".join(f"{k}={_fmt(numbers[k])}" for k in keys[:limit])


def _effect_line(effect: dict[str, Any]) -> str:
    if not effect:
        return "no layer with running statistics"
    parts = []
    if effect.get("output_change") is not None:
        parts.append(f"eval outputs change {effect['output_change']:.3g} (relative)")
    if "accuracy_running" in effect:
        parts.append(
            f"accuracy {effect['accuracy_running']:.3f} (running) vs "
            f"{effect['accuracy_exact']:.3f} (exact)"
        )
    if effect.get("loss_running") is not None and effect.get("loss_exact") is not None:
        parts.append(f"loss {effect['loss_running']:.4g} vs {effect['loss_exact']:.4g}")
    return "running vs exact statistics: " + "; ".join(parts)


def render_text(d: Diagnosis) -> str:
    """Compact table, worst first: severity, rule, layer, numbers, and the prescription."""
    head = (
        f"bnorm doctor: {d.model_name}: {len(d.layers)} batch-norm layer(s), "
        f"{d.batches_used} batch(es); {_effect_line(d.effect)}"
    )
    if not d.findings:
        return head + "\nno findings: the batch normalization looks healthy"
    rows = [("severity", "rule", "layer", "measured")]
    rows += [(f.severity, f.rule, f.layer, _numbers(f.numbers)) for f in d.findings]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head]
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        )
        if i:
            lines.append(" " * (widths[0] + 2) + "fix: " + d.findings[i - 1].prescription)
    return "\n".join(lines)


def render_treatment(t: Treatment) -> str:
    before, after = t.before, t.after
    lines = ["applied: " + ("; ".join(t.applied) if t.applied else "nothing (no safe fix)")]
    lines.append(f"before: {len(before.findings)} finding(s); {_effect_line(before.effect)}")
    lines.append(f"after:  {len(after.findings)} finding(s); {_effect_line(after.effect)}")
    gone = sorted(
        {(f.rule, f.layer) for f in before.findings} - {(f.rule, f.layer) for f in after.findings}
    )
    if gone:
        lines.append("cured: " + ", ".join(f"{r} at {n}" for r, n in gone))
    if after.findings:
        lines.append("remaining:\n" + str(after).split("\n", 1)[-1])
    return "\n".join(lines)


# --- HTML -------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
.sev { font-weight: 600; white-space: nowrap; padding: 0.1em 0.5em; border-radius: 0.3em; }
.high { background: #f6d6d6; } .medium { background: #f6ecc8; } .low { background: #e4ecf6; }
.healthy { background: #d8f0d8; padding: 0.5em; border-radius: 0.3em; }
code { background: #f3f3f3; padding: 0 0.2em; }
.meta { color: #555; font-size: 0.9em; }
svg.chart { display: block; margin: 0.5em 0 1.5em; background: #fff; }
"""

# Counts, once loaded, the charts that really rendered (non-empty bounding box), so a headless
# browser test can check the page draws every chart.
_SCRIPT = """
window.addEventListener('load', function () {
  var charts = document.querySelectorAll('svg.chart');
  var ok = 0;
  charts.forEach(function (c) { var b = c.getBBox(); if (b.width > 0 && b.height > 0) { ok++; } });
  document.body.setAttribute('data-charts-total', String(charts.length));
  document.body.setAttribute('data-charts-rendered', String(ok));
});
"""

_MAX_CHANNELS = 64  # a chart wider than this is unreadable; the rest is in the JSON


def _e(text: object) -> str:
    return html.escape(str(text))


def _chart(r: LayerReport) -> str:
    """Two panels per layer, channels on x: the mean (exact: dot with a ±1 std bar, running:
    ring), and the variance on a log scale (exact: dot, running: ring)."""
    c = min(r.mean.numel(), _MAX_CHANNELS)
    mean = [float(v) for v in r.mean[:c]]
    std = [math.sqrt(max(float(v), 0.0)) for v in r.var[:c]]
    rmean = None if r.running_mean is None else [float(v) for v in r.running_mean[:c]]
    var = [max(float(v), 1e-12) for v in r.var[:c]]
    rvar = None if r.running_var is None else [max(float(v), 1e-12) for v in r.running_var[:c]]
    w, h, left, top, gap = 760, 150, 60, 18, 34
    step = (w - left - 10) / max(c, 1)

    def xs(i: int) -> float:
        return left + step * (i + 0.5)

    def panel(
        y0: float,
        values: list[float],
        running: list[float] | None,
        lo: float,
        hi: float,
        label: str,
        bars: list[float] | None,
        log: bool,
    ) -> str:
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        a, b = f(lo), f(hi)
        span = (b - a) or 1.0

        def ys(v: float) -> float:
            v = min(max(f(v) if not log else f(max(v, lo)), a), b)
            return y0 + h - (v - a) / span * h

        parts = [
            f'<rect x="{left}" y="{y0}" width="{w - left - 10}" height="{h}" fill="none" '
            'stroke="#ccc"/>',
            f'<text x="4" y="{y0 + 12}" font-size="11">{_e(label)}</text>',
            f'<text x="4" y="{y0 + h}" font-size="10" fill="#555">{lo:.3g}</text>',
            f'<text x="4" y="{y0 + 24}" font-size="10" fill="#555">{hi:.3g}</text>',
        ]
        for i, v in enumerate(values):
            if bars is not None:
                parts.append(
                    f'<line x1="{xs(i):.1f}" x2="{xs(i):.1f}" y1="{ys(v - bars[i]):.1f}" '
                    f'y2="{ys(v + bars[i]):.1f}" stroke="#9ab"/>'
                )
            parts.append(f'<circle cx="{xs(i):.1f}" cy="{ys(v):.1f}" r="2.6" fill="#1f5fa8"/>')
            if running is not None:
                parts.append(
                    f'<circle cx="{xs(i):.1f}" cy="{ys(running[i]):.1f}" r="3.6" fill="none" '
                    'stroke="#d9480f" stroke-width="1.4"/>'
                )
        return "".join(parts)

    lo_m = min([m - s for m, s in zip(mean, std, strict=True)] + (rmean or []))
    hi_m = max([m + s for m, s in zip(mean, std, strict=True)] + (rmean or []))
    all_v = var + (rvar or [])
    body = panel(top, mean, rmean, lo_m, hi_m, "mean", std, False)
    body += panel(top + h + gap, var, rvar, min(all_v), max(all_v) * 1.01, "variance", None, True)
    height = top + 2 * h + gap + 22
    legend = (
        f'<text x="{left}" y="{height - 6}" font-size="11">● exact (±1 std)   '
        f'<tspan fill="#d9480f">○ running</tspan>   channels 0–{c - 1}'
        f"{' of ' + str(r.mean.numel()) if c < r.mean.numel() else ''}</text>"
    )
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" '
        f'role="img" aria-label="{_e(r.name)}: running vs exact statistics">{body}{legend}</svg>'
    )


def render_html(d: Diagnosis) -> str:
    """The self-contained page: summary, findings table, and a chart per layer."""
    if d.findings:
        rows = "".join(
            f'<tr><td><span class="sev {_e(f.severity)}">{_e(f.severity)}</span></td>'
            f"<td>{_e(f.rule)}</td><td><code>{_e(f.layer)}</code></td>"
            f"<td>{_e(_numbers(f.numbers, 8))}</td><td>{_e(f.explanation)}</td>"
            f"<td><code>{_e(f.prescription)}</code></td></tr>"
            for f in d.findings
        )
        findings = (
            '<table id="findings"><tr><th>severity</th><th>rule</th><th>layer</th>'
            f"<th>measured</th><th>why</th><th>prescription</th></tr>{rows}</table>"
        )
    else:
        findings = (
            '<p class="healthy" id="findings">No findings: the batch normalization looks '
            "healthy.</p>"
        )
    sections = "".join(
        f'<section class="layer"><h3><code>{_e(r.name)}</code> <small>{_e(r.kind)}, '
        f"{r.count} values per channel over {len(r.batch_sizes)} batches</small></h3>"
        f"{_chart(r)}</section>"
        for r in d.layers
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>bnorm doctor: {_e(d.model_name)}</title>"
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f"<h1>bnorm doctor: <code>{_e(d.model_name)}</code></h1>"
        f'<p class="meta">{len(d.layers)} batch-norm layer(s), {d.batches_used} batch(es); '
        f"{_e(_effect_line(d.effect))}</p>"
        f"<h2>Findings</h2>{findings}"
        "<h2>Running vs exact statistics, per layer</h2>"
        f"{sections}</body></html>"
    )


# --- command line -----------------------------------------------------------------------------


class TargetError(Exception):
    """A ``MODULE:FUNCTION`` target that cannot be used (one line for the user)."""


def load_target(spec: str) -> tuple[Any, Any, Any]:
    """Import ``MODULE:FUNCTION`` (MODULE a dotted name or a ``.py`` path), call FUNCTION and
    return ``(model, batches, targets or None)``."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise TargetError(f"expected MODULE:FUNCTION, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise TargetError(f"no such file: {module_name}")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            assert spec_ is not None and spec_.loader is not None
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except TargetError:
        raise
    except ModuleNotFoundError as exc:
        raise TargetError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise TargetError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TargetError(f"{module_name!r} has no function {func_name!r}")
    try:
        result = func()
    except Exception as exc:
        raise TargetError(f"{spec}() raised {type(exc).__name__}: {exc}") from None
    import torch

    if (
        not isinstance(result, tuple)
        or len(result) not in (2, 3)
        or not isinstance(result[0], torch.nn.Module)
    ):
        raise TargetError(
            f"{spec}() must return (model, batches) or (model, batches, targets), "
            f"got {type(result).__name__}"
        )
    return result[0], result[1], result[2] if len(result) == 3 else None


def _run(args: argparse.Namespace) -> int:
    from .doctor import doctor

    try:
        if args.example:
            from .clinic import EXAMPLES, example

            if args.example not in EXAMPLES:
                raise TargetError(
                    f"no clinic example {args.example!r}; choose from {', '.join(EXAMPLES)}"
                )
            model, batches, targets = example(args.example)
            name = args.example
        elif args.target:
            model, batches, targets = load_target(args.target)
            name = args.target
        else:
            raise TargetError("give MODULE:FUNCTION or --example NAME")
        diagnosis = doctor(model, batches, num_batches=args.num_batches, targets=targets, name=name)
    except (TargetError, TypeError, ValueError) as exc:
        print(f"bnorm doctor: error: {exc}", file=sys.stderr)
        return 2
    print(diagnosis)
    if args.apply:
        print()
        print(diagnosis.apply())
    if args.json:
        diagnosis.to_json(args.json)
        print(f"JSON: {args.json}")
    if args.html:
        diagnosis.to_html(args.html)
        print(f"HTML: {args.html}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``bnorm doctor`` on the ``bnorm`` command's subparsers."""
    from .clinic import EXAMPLES

    p = sub.add_parser(
        "doctor",
        help="diagnose the batch normalization of a model, and prescribe remedies",
        description=(
            "Diagnose the batch-norm layers of a model on its batches. TARGET is MODULE:FUNCTION "
            "(MODULE a dotted name or a .py file); FUNCTION() returns (model, batches) or "
            "(model, batches, targets). Exit code 0 when the diagnosis ran (findings or not), "
            "2 for a target that cannot be used."
        ),
    )
    p.add_argument(
        "target", nargs="?", help="MODULE:FUNCTION returning (model, batches[, targets])"
    )
    p.add_argument("--example", metavar="NAME", help=f"a clinic example: {', '.join(EXAMPLES)}")
    p.add_argument("--num-batches", type=int, default=None, help="use at most this many batches")
    p.add_argument(
        "--apply", action="store_true", help="apply the safe fixes to a copy, re-measure"
    )
    p.add_argument("--html", metavar="PATH", help="write the HTML report here")
    p.add_argument("--json", metavar="PATH", help="write the JSON diagnosis here")
    p.set_defaults(func=_run)
