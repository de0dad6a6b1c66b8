"""What an experiment of the lab is: a claim, a setup, a run per seed, a summary and a rule.

Every experiment of ``bnorm lab`` lives in its own file under :mod:`bnorm.lab.experiments` and
defines one :class:`Experiment`. The runner calls :attr:`Experiment.run` once per seed (the
results are JSON, written atomically so an interrupted run resumes), then
:attr:`Experiment.summarize` over all seeds, then :attr:`Experiment.decide` on the summary's
numbers. The verdict is therefore always computed from the numbers of *this* run by a rule
written next to the experiment (and printed in the report as :attr:`Experiment.rule`); nothing
is decided by hand. Rules compare paired-by-seed numbers with a 95% interval
(:mod:`bnorm.lab.verdict`); when the interval straddles the rule's margin the verdict is
"inconclusive", and the runner may add seeds (up to :attr:`Experiment.max_seeds`) to decide.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .verdict import VERDICTS as VERDICTS
from .verdict import Check as Check
from .verdict import Decision as Decision
from .verdict import Verdict as Verdict
from .verdict import all_of as all_of
from .verdict import check as check

JSON = dict[str, Any]


@dataclass
class Summary:
    """What the report shows of an experiment.

    ``numbers`` are the key numbers the rule looks at (JSON), including the per-seed paired
    values it decides from; ``headline`` is the one-line summary of the numbers that are not
    judged (the judged ones are shown from the decision's checks, so each is printed once);
    ``rows`` is a small table (a list of dicts with the same keys, in column order) for the
    experiment's section; ``notes`` are paragraphs of text under it (plain text; spans in
    backticks are shown as code).
    """

    numbers: JSON
    headline: str
    rows: list[JSON] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Experiment:
    """One claim of the article, measured.

    Attributes:
        name: the command-line name (``bnorm lab run NAME``).
        title: a short human title.
        claim: the claim, quoted from the article.
        setup: what is trained on which data, in words (the report shows it with the config).
        rule: the verdict rule in words; :attr:`decide` implements exactly this.
        config: ``config(quick) -> dict`` of JSON-able settings; ``quick`` is the CI-sized run.
        run: ``run(seed, config) -> dict`` one seed's results (JSON-able, no NaN: use None).
        summarize: ``summarize(results, config) -> Summary`` over all seeds' results.
        decide: ``decide(summary.numbers) -> Decision`` (the verdict and its checks).
        plot: ``plot(results, config, directory) -> [file names]`` writes PNG files.
        seeds: number of seeds to start with, as ``(quick, full)``.
        max_seeds: at most this many seeds, as ``(quick, full)``: while the verdict is
            inconclusive the runner adds one seed at a time, until the maximum or the run's
            time budget is reached.
    """

    name: str
    title: str
    claim: str
    setup: str
    rule: str
    config: Callable[[bool], JSON]
    run: Callable[[int, JSON], JSON]
    summarize: Callable[[Sequence[JSON], JSON], Summary]
    decide: Callable[[Mapping[str, Any]], Decision]
    plot: Callable[[Sequence[JSON], JSON, Path], list[str]]
    seeds: tuple[int, int] = (2, 5)
    max_seeds: tuple[int, int] = (3, 10)


# Small statistics helpers shared by the experiments: median and spread over seeds.


def median(values: Sequence[float | None]) -> float | None:
    """Median of the finite values, None when there are none."""
    kept = [float(v) for v in values if v is not None and v == v]
    return statistics.median(kept) if kept else None


def paired(results: Sequence[JSON], value: Callable[[JSON], float]) -> list[float]:
    """``value(result)`` for each seed's result: one paired number per seed, in seed order."""
    return [float(value(r)) for r in results]


def spread(values: Sequence[float | None], fmt: str = "{:.3f}") -> str:
    """``median [min–max]`` text of the values (None entries are counted as missing)."""
    kept = [float(v) for v in values if v is not None and v == v]
    if not kept:
        return f"never ({len(values)} of {len(values)})" if values else "–"
    mid, low, high = (fmt.format(v) for v in (statistics.median(kept), min(kept), max(kept)))
    text = f"{mid} [{low}–{high}]"
    missing = len(values) - len(kept)
    return text + (f" ({missing} of {len(values)} never)" if missing else "")
