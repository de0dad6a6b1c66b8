"""Verdicts with their uncertainty: paired-by-seed differences and a 95% t-interval.

Every rule of the lab compares two arms trained from the *same seed* (same initial weights where
the models allow it, same data order). Per seed it computes one number — a difference of
accuracies, a ratio of steps, … — so the seed-to-seed variation that both arms share cancels.
Over the seeds ``d_1 … d_n`` the rule looks at the mean and its two-sided 95% **Student-t
interval**::

    mean ± t_{0.975, n-1} · s / sqrt(n),      s = sample standard deviation of the d_i

A t-interval and not a bootstrap: with the 3–10 seeds a lab can afford, a percentile bootstrap
over seeds is too narrow (it cannot see more spread than the few values show, and with n = 3
it has only 10 distinct resamples), while the t-interval widens with the t quantile exactly as
the small sample warrants. It is deterministic, so two reports of the same seed files agree.

A :class:`Check` is one comparison against a **margin** on a stated side: "above" means the
claim needs the quantity to exceed the margin, "below" to stay under it. Its verdict is

- ``supported`` when the whole interval lies on the claim's side of the margin,
- ``not supported`` when the whole interval lies on the other side,
- ``inconclusive`` when the interval contains the margin: these seeds cannot decide — and
  always with fewer than :data:`MIN_SEEDS` seeds: accuracies and step counts are discrete, so
  two seeds often give the same paired value by coincidence, and a zero-width interval from
  two values is no evidence.

:func:`all_of` combines the checks of a claim that needs every one of them (supported when all
are; not supported as soon as one clearly fails; inconclusive otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Verdict = Literal["supported", "not supported", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("supported", "not supported", "inconclusive")
Side = Literal["above", "below"]
LEVEL = 0.95
MIN_SEEDS = 3  # a check decides only from at least this many seeds


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t interval of the mean of ``values`` at ``level``.

    One value gives an infinite interval (nothing is known about the spread); identical values
    give a zero-width one. Non-finite values are refused: a rule must map a diverged run to a
    number (e.g. chance accuracy, or the step limit + 1) before it gets here.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("t_interval needs at least one value")
    if not all(math.isfinite(v) for v in xs):
        raise ValueError(f"t_interval got a non-finite value: {xs}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, -math.inf, math.inf
    from scipy.stats import t  # scipy comes with scikit-learn (the lab extra)

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Check:
    """One paired comparison of a rule: per-seed ``values``, their interval, and the verdict.

    ``label`` says what a value is (e.g. "BN − no BN final test accuracy"); ``margin`` and
    ``side`` say what the claim needs ("above": mean > margin; "below": mean < margin);
    ``fmt`` formats the numbers in text.
    """

    label: str
    values: tuple[float, ...]
    margin: float
    side: Side
    mean: float
    low: float
    high: float
    verdict: Verdict
    fmt: str = "{:+.3f}"

    @property
    def n(self) -> int:
        return len(self.values)

    def interval_text(self) -> str:
        """``mean [low, high]`` with the check's format."""
        f = self.fmt.format
        return f"{f(self.mean)} [{f(self.low)}, {f(self.high)}]"

    def text(self) -> str:
        """E.g. ``BN − no BN accuracy: +0.031 [+0.012, +0.050] (claim: > +0.020) supported``."""
        sign = ">" if self.side == "above" else "<"
        return (
            f"{self.label}: {self.interval_text()} (claim: {sign} "
            f"{self.fmt.format(self.margin)}; {self.n} seeds) {self.verdict}"
        )

    def decision(self) -> Decision:
        """A rule with this one check."""
        return Decision(self.verdict, [self])

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["values"] = list(self.values)
        for k in ("low", "high"):  # JSON has no infinity
            if not math.isfinite(out[k]):
                out[k] = None
        return out


def check(
    label: str, values: Iterable[float], margin: float, side: Side, fmt: str = "{:+.3f}"
) -> Check:
    """The :class:`Check` of paired per-seed ``values`` against ``margin`` on ``side``."""
    if side not in ("above", "below"):
        raise ValueError(f"side must be 'above' or 'below', got {side!r}")
    vals = tuple(float(v) for v in values)
    mean, low, high = t_interval(vals)
    claim_side, other_side = (low > margin, high < margin)
    if side == "below":
        claim_side, other_side = other_side, claim_side
    if len(vals) < MIN_SEEDS:
        claim_side = other_side = False
    verdict: Verdict = (
        "supported" if claim_side else "not supported" if other_side else "inconclusive"
    )
    return Check(label, vals, float(margin), side, mean, low, high, verdict, fmt)


@dataclass
class Decision:
    """A rule's verdict and the checks it was decided from (in the rule's order)."""

    verdict: Verdict
    checks: list[Check] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "checks": [c.to_json() for c in self.checks]}


def all_of(*checks: Check) -> Decision:
    """A claim that needs every check: supported if all are, not supported if any clearly
    fails, inconclusive otherwise."""
    verdicts = [c.verdict for c in checks]
    if all(v == "supported" for v in verdicts):
        verdict: Verdict = "supported"
    elif any(v == "not supported" for v in verdicts):
        verdict = "not supported"
    else:
        verdict = "inconclusive"
    return Decision(verdict, list(checks))


def interval_text_json(c: Mapping[str, Any]) -> str:
    """:meth:`Check.interval_text` from a check's JSON (None bounds print as ∓∞)."""
    f = c.get("fmt", "{:+.3f}").format
    low = "−∞" if c["low"] is None else f(c["low"])
    high = "∞" if c["high"] is None else f(c["high"])
    return f"{f(c['mean'])} [{low}, {high}]"
