"""Each experiment's verdict rule on synthetic numbers: every verdict is reachable, and the
boundaries sit where the rule's text says."""

from __future__ import annotations

import json

import pytest

from bnorm.lab.experiments import (
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


def test_ioffe_fig1():
    def n(ratio, bn_drift, plain_drift):
        return {
            "steps_ratio": ratio,
            "variants": {"BN": {"median_drift": bn_drift}, "no BN": {"median_drift": plain_drift}},
        }

    assert ioffe_fig1.decide(n(0.5, 0.1, 1.0)) == "supported"
    assert ioffe_fig1.decide(n(0.51, 0.1, 1.0)) == "mixed"
    assert ioffe_fig1.decide(n(0.2, 1.0, 1.0)) == "mixed"
    assert ioffe_fig1.decide(n(0.9, 2.0, 1.0)) == "not supported"


def test_learning_rate():
    def n(bn_mult, plain_mult, bn_steps, plain_steps):
        return {
            "BN": {"max_usable_multiplier": bn_mult, "best_median_steps": bn_steps},
            "no BN": {"max_usable_multiplier": plain_mult, "best_median_steps": plain_steps},
        }

    assert learning_rate.decide(n(30, 5, 50, 100)) == "supported"
    assert learning_rate.decide(n(30, 5, 100, 100)) == "mixed"
    assert learning_rate.decide(n(5, 5, 50, 100)) == "mixed"
    assert learning_rate.decide(n(5, 30, 100, 50)) == "not supported"


def test_init():
    def n(bn_range, bn_worst, plain_range, plain_worst):
        return {
            "BN": {"range": bn_range, "worst": bn_worst},
            "no BN": {"range": plain_range, "worst": plain_worst},
        }

    assert init.decide(n(0.1, 0.85, 0.2, 0.75)) == "supported"
    assert init.decide(n(0.1, 0.70, 0.2, 0.75)) == "mixed"  # narrower but worse at its worst
    assert init.decide(n(0.15, 0.85, 0.2, 0.75)) == "mixed"
    assert init.decide(n(0.2, 0.85, 0.2, 0.75)) == "not supported"


def test_regularization():
    def n(bn_gap, bn_test, plain_gap, plain_test):
        return {
            "BN": {"median_gap": bn_gap, "median_test_acc": bn_test},
            "plain": {"median_gap": plain_gap, "median_test_acc": plain_test},
        }

    assert regularization.decide(n(0.07, 0.91, 0.09, 0.90)) == "supported"
    assert regularization.decide(n(0.085, 0.91, 0.09, 0.90)) == "mixed"
    assert regularization.decide(n(0.05, 0.89, 0.09, 0.90)) == "mixed"
    assert regularization.decide(n(0.09, 0.95, 0.09, 0.90)) == "not supported"


def test_sigmoid():
    def n(bn, plain, depths=(3, 4, 6, 8)):
        return {
            "depths": list(depths),
            "BN": {"trainable_depths": bn},
            "no BN": {"trainable_depths": plain},
        }

    assert sigmoid.decide(n([3, 4, 6, 8], [3])) == "supported"
    assert sigmoid.decide(n([3, 4, 6], [3])) == "mixed"
    assert sigmoid.decide(n([3, 4, 6, 8], [3, 8])) == "mixed"  # no BN also trains the deepest
    assert sigmoid.decide(n([3, 4], [3, 4])) == "not supported"


def test_batch_size():
    def n(gap_small, gap_large):
        return {"small": 2, "large": 128, "bn_minus_gn": {"2": gap_small, "128": gap_large}}

    assert batch_size.decide(n(0.05, 0.10)) == "supported"
    assert batch_size.decide(n(0.06, 0.10)) == "mixed"
    assert batch_size.decide(n(0.10, 0.10)) == "not supported"


def test_rnn():
    def n(lstm, g01, g10):
        return {
            "LSTM": {"median_final_test_acc": lstm},
            "BN-LSTM γ=0.1": {"median_final_test_acc": g01},
            "BN-LSTM γ=1.0": {"median_final_test_acc": g10},
            "LN-LSTM": {"median_final_test_acc": 0.5},
        }

    assert rnn.decide(n(0.50, 0.60, 0.55)) == "supported"
    assert rnn.decide(n(0.50, 0.60, 0.59)) == "not supported"  # γ does not matter, BN helps
    # the care backfires: BN dropped in as is (γ = 1.0) is the best of the three
    assert rnn.decide(n(0.50, 0.52, 0.68)) == "not supported"
    assert rnn.decide(n(0.50, 0.51, 0.45)) == "mixed"  # γ matters, BN barely helps
    assert rnn.decide(n(0.50, 0.50, 0.50)) == "mixed"


def test_train_vs_inference():
    def n(gap):
        return {"2 classes per batch": {"gap": gap}}

    assert train_vs_inference.decide(n(0.05)) == "supported"
    assert train_vs_inference.decide(n(0.02)) == "mixed"
    assert train_vs_inference.decide(n(0.0)) == "not supported"


def test_cost():
    assert cost.decide({"bn_over_plain": 1.05}) == "supported"
    assert cost.decide({"bn_over_plain": 1.02}) == "mixed"
    assert cost.decide({"bn_over_plain": 0.98}) == "not supported"


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
    assert module.decide(summary.numbers) in ("supported", "not supported", "mixed")
    for name in module.plot([first], cfg, tmp_path):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
