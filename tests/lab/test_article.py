"""Experiment `article`: a tiny run, its summary, and the Keras anchor (the article's own code)."""

from __future__ import annotations

import json

import pytest

from bnorm.lab import keras_anchor
from bnorm.lab.experiments import article


def test_tiny_run_summary_and_plot(tmp_path):
    cfg = dict(article.config(True), epochs=3)
    results = [article.run(seed, cfg) for seed in (0, 1)]
    json.dumps(results, allow_nan=False)
    assert article.run(0, cfg)["no BN"]["test_acc"] == results[0]["no BN"]["test_acc"]
    assert "keras" not in results[0]  # quick runs skip the anchor
    summary = article.summarize(results, cfg)
    assert set(summary.numbers["variants"]) == set(article.VARIANTS)
    for key, values in summary.numbers["per_seed"].items():
        variant = key.split(" / ")[0]
        expected = [
            article._censored(r[variant]["first_epoch"], 3)
            / article._censored(r["no BN"]["first_epoch"], 3)
            for r in results
        ]
        assert values == expected
    assert article.decide(summary.numbers).verdict in ("supported", "not supported", "inconclusive")
    assert "full runs only" in summary.notes[0]
    files = article.plot(results, cfg, tmp_path)
    assert (tmp_path / files[0]).read_bytes()[:4] == b"\x89PNG"


def test_without_keras_the_report_says_why(monkeypatch):
    """A full run on a machine without keras: the anchor is skipped, the note names the reason,
    and the rest of the experiment runs."""
    monkeypatch.setattr(keras_anchor, "keras_status", lambda: (None, "keras is not installed"))
    article.keras_version.cache_clear()
    try:
        cfg = dict(article.config(False), epochs=2)
        assert cfg["keras"] is None and cfg["keras_anchor"] is True
        results = [article.run(seed, cfg) for seed in (0, 1)]
        summary = article.summarize(results, cfg)
    finally:
        article.keras_version.cache_clear()
    assert summary.numbers["keras"] == {"version": None, "reason": "keras is not installed"}
    assert summary.notes == ["Keras anchor: not run — keras is not installed."]


def _keras_or_skip():
    keras, why = keras_anchor.keras_status()
    if keras is None:
        pytest.skip(f"Keras anchor needs keras 3 on the torch backend: {why}")
    return keras


def test_keras_anchor_two_epochs():
    """The article's Keras code (and the two BN placements) trained two epochs on the same
    data and batches; deterministic from the seed; summarized beside the PyTorch runs."""
    keras = _keras_or_skip()
    assert keras.backend.backend() == "torch"
    cfg = dict(article.config(False), epochs=2)
    assert cfg["keras"] == keras.__version__
    results = [article.run(seed, cfg) for seed in (0, 1)]
    json.dumps(results, allow_nan=False)
    for r in results:
        assert set(r["keras"]) == set(keras_anchor.VARIANTS) == set(article.VARIANTS)
        for run in r["keras"].values():
            assert len(run["test_acc"]) == len(run["train_acc"]) == 2
            assert all(0.0 <= a <= 1.0 for a in run["test_acc"])
    again = keras_anchor.train_keras(
        "BN before ReLU", 0, epochs=2, batch_size=32, data=article.load_circles(), target=0.8
    )
    assert again["test_acc"] == results[0]["keras"]["BN before ReLU"]["test_acc"]
    summary = article.summarize(results, cfg)
    anchor = summary.numbers["keras"]
    assert anchor["version"] == keras.__version__
    for variant, d in anchor["variants"].items():
        diffs = [r["keras"][variant]["test_acc"][-1] - r[variant]["test_acc"][-1] for r in results]
        assert d["final_test_acc_difference"]["mean"] == pytest.approx(sum(diffs) / 2)
        assert d["final_test_acc_difference"]["n"] == 2
    assert summary.notes[0].startswith("Keras anchor (the article's code on Keras")
    assert {row["framework"] for row in summary.rows} == {
        "PyTorch (bnorm)",
        f"Keras {keras.__version__} (torch backend)",
    }


def test_keras_model_is_the_article_code():
    """As printed: Dense(50, relu, he_uniform) → Dense(1, sigmoid); BN added after the Dense
    (the code's place) or between Dense and ReLU (the text's place)."""
    keras = _keras_or_skip()
    layers = {
        v: [type(layer).__name__ for layer in keras_anchor.build_article_model(keras, v).layers]
        for v in keras_anchor.VARIANTS
    }
    assert layers["no BN"] == ["Dense", "Dense"]
    assert layers["BN after ReLU"] == ["Dense", "BatchNormalization", "Dense"]
    assert layers["BN before ReLU"] == ["Dense", "BatchNormalization", "Activation", "Dense"]
    first = keras_anchor.build_article_model(keras, "no BN").layers[0]
    assert first.activation.__name__ == "relu" and first.units == 50
