"""Experiment `article`: its rule and a tiny run."""

from __future__ import annotations

import json

from bnorm.lab.experiments import article


def _numbers(after: float, before: float) -> dict:
    return {
        "variants": {
            "no BN": {"ratio_to_no_bn": 1.0},
            "BN after ReLU": {"ratio_to_no_bn": after},
            "BN before ReLU": {"ratio_to_no_bn": before},
        }
    }


def test_rule():
    assert article.decide(_numbers(0.5, 0.75)) == "supported"
    assert article.decide(_numbers(0.5, 0.76)) == "mixed"
    assert article.decide(_numbers(0.8, 1.4)) == "not supported"


def test_tiny_run_summary_and_plot(tmp_path):
    cfg = dict(article.config(True), epochs=3)
    results = [article.run(seed, cfg) for seed in (0, 1)]
    json.dumps(results, allow_nan=False)
    assert article.run(0, cfg)["no BN"]["test_acc"] == results[0]["no BN"]["test_acc"]
    summary = article.summarize(results, cfg)
    assert set(summary.numbers["variants"]) == set(article.VARIANTS)
    # 3 epochs never reach 80% from these seeds' start, so every run is censored at epochs + 1
    # unless it got there: the median is between 1 and 4 and the ratio follows from it.
    for v in summary.numbers["variants"].values():
        assert 1 <= v["median_epochs"] <= 4
    assert article.decide(summary.numbers) in ("supported", "mixed", "not supported")
    files = article.plot(results, cfg, tmp_path)
    assert (tmp_path / files[0]).read_bytes()[:4] == b"\x89PNG"
