"""Each experiment's verdict rule on synthetic per-seed numbers: a clear win is "supported", a
clear loss "not supported", values whose interval straddles the margin "inconclusive"; and the
margins sit where the rule's text says."""

from __future__ import annotations

import json

import pytest

from bnorm.lab.experiments import (
    article,
    batch_size,
    cost,
    init,
    ioffe_fig1,
    learning_rate,
    regularization,
    rnn,
    sigmoid,
    train_vs_inference,
)
from bnorm.lab.verdict import VERDICTS

# Per rule: extra numbers it reads, and per paired key the margin and side its text states.
RULES = {
    "article": (
        article,
        {},
        {
            "BN after ReLU / no BN epochs": (0.75, "below"),
            "BN before ReLU / no BN epochs": (0.75, "below"),
        },
    ),
    "ioffe-fig1": (
        ioffe_fig1,
        {},
        {"steps_ratio": (0.5, "below"), "drift_difference": (0.0, "below")},
    ),
    "learning-rate": (
        learning_rate,
        {"top_multiplier": 30},
        {"top_rate_acc_difference": (0.05, "above"), "fewest_steps_ratio": (1.0, "below")},
    ),
    "init": (init, {}, {"range_difference": (-0.05, "below")}),
    "regularization": (regularization, {}, {"gap_difference": (-0.01, "below")}),
    "sigmoid": (sigmoid, {"deepest": 8}, {"deepest_acc_difference": (0.05, "above")}),
    "batch-size": (batch_size, {"small": 2, "large": 128}, {"gap_change": (-0.05, "below")}),
    "rnn": (
        rnn,
        {},
        {"careful_minus_lstm": (0.02, "above"), "careful_minus_naive": (0.02, "above")},
    ),
    "train-vs-inference": (train_vs_inference, {}, {"gap": (0.05, "above")}),
    "cost": (cost, {}, {"bn_over_plain": (1.05, "above")}),
}
NOISE = (0.0, 0.004, -0.004, 0.002, -0.002)


def _side(margin: float, side: str, win: bool, distance: float = 0.2) -> list[float]:
    """Five per-seed values ``distance`` beyond (win) or short of (loss) the margin."""
    sign = (1 if side == "above" else -1) * (1 if win else -1)
    return [margin + sign * distance + e for e in NOISE]


def _straddle(margin: float) -> list[float]:
    return [margin + e for e in (-0.3, 0.3, -0.1, 0.1, 0.05)]


def _numbers(extra: dict, per_seed: dict) -> dict:
    return {**extra, "per_seed": per_seed}


@pytest.mark.parametrize("name", list(RULES))
def test_clear_win_is_supported(name):
    module, extra, keys = RULES[name]
    d = module.decide(_numbers(extra, {k: _side(m, s, True) for k, (m, s) in keys.items()}))
    assert d.verdict == "supported"
    assert [c.verdict for c in d.checks] == ["supported"] * len(keys)


@pytest.mark.parametrize("name", list(RULES))
def test_clear_loss_is_not_supported(name):
    module, extra, keys = RULES[name]
    # Only the first check fails clearly; a claim needing every check is then not supported.
    per_seed = {k: _side(m, s, i > 0) for i, (k, (m, s)) in enumerate(keys.items())}
    assert module.decide(_numbers(extra, per_seed)).verdict == "not supported"


@pytest.mark.parametrize("name", list(RULES))
def test_interval_straddling_the_margin_is_inconclusive(name):
    module, extra, keys = RULES[name]
    # Only the first check straddles; the others win: the claim cannot be decided.
    per_seed = {
        k: _straddle(m) if i == 0 else _side(m, s, True)
        for i, (k, (m, s)) in enumerate(keys.items())
    }
    d = module.decide(_numbers(extra, per_seed))
    assert d.verdict == "inconclusive"
    first = d.checks[0]
    assert first.low < first.margin < first.high  # the interval shown contains the margin


@pytest.mark.parametrize("name", list(RULES))
def test_margin_is_where_the_rule_says(name):
    """Identical values just beyond the margin decide one way, just short of it the other."""
    module, extra, keys = RULES[name]
    for win, verdict in ((True, "supported"), (False, "not supported")):
        per_seed = {
            k: [m + (1 if (s == "above") == win else -1) * 1e-3] * 3 for k, (m, s) in keys.items()
        }
        assert module.decide(_numbers(extra, per_seed)).verdict == verdict


def test_rule_texts_name_the_interval_and_inconclusive():
    for module, _, _ in RULES.values():
        rule = module.EXPERIMENT.rule
        assert "95%" in rule and "inconclusive" in rule, module.__name__
        assert "mixed" not in rule


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("module", "tiny"),
    [
        (ioffe_fig1, {"steps": 20, "eval_every": 10}),
        (sigmoid, {"steps": 10, "eval_every": 10, "depths": [3]}),
        (train_vs_inference, {"steps": 10, "eval_every": 10}),
        (cost, {"repeats": 2, "warmup": 1, "batch": 8, "image": 8}),
    ],
)
def test_tiny_runs_are_json_and_deterministic(module, tiny, tmp_path):
    cfg = dict(module.config(True), **tiny)
    first = module.run(0, cfg)
    json.dumps(first, allow_nan=False)
    if module is not cost:  # timings differ run to run; everything else must not
        assert _without_timings(module.run(0, cfg)) == _without_timings(first)
    summary = module.summarize([first, module.run(1, cfg)], cfg)
    for values in summary.numbers["per_seed"].values():
        assert len(values) == 2  # one paired value per seed
    assert module.decide(summary.numbers).verdict in VERDICTS
    for name in module.plot([first], cfg, tmp_path):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_learning_rate_counts_chance_accuracy_as_failed():
    """A run that ends at chance accuracy with a finite loss counts as failed, like a
    non-finite loss (the rule's definition of "failed")."""
    run = {"final_test_acc": 0.098, "diverged": False}
    assert learning_rate.failed(run)
    assert learning_rate.failed({"final_test_acc": None, "diverged": True})
    assert not learning_rate.failed({"final_test_acc": 0.9, "diverged": False})
    assert learning_rate.final_accuracy({"final_test_acc": None, "diverged": True}) == 0.1
