"""Experiment ``regularization``: does batch normalization reduce overfitting?

A 784-256-256-10 ReLU MLP trained on only 1,000 real MNIST digits, long enough to fit them:
the gap between training and test accuracy (and loss-free: accuracy only) measures overfitting.
Compared: no regularization, batch normalization, dropout (p = 0.3), both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data import mnist5k
from ..experiment import JSON, Decision, Experiment, Summary, check, median, spread
from ..models import mlp, seeded, subset, train
from ..plots import band_plot

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"bn": False, "dropout": 0.0},
    "BN": {"bn": True, "dropout": 0.0},
    "dropout 0.3": {"bn": False, "dropout": 0.3},
    "BN + dropout 0.3": {"bn": True, "dropout": 0.3},
}
MARGIN = 0.01  # a gap "smaller" by at least one point of accuracy


def config(quick: bool) -> JSON:
    return {
        "train_samples": 1000,
        "steps": 300 if quick else 1500,
        "eval_every": 50 if quick else 100,
        "batch_size": 50,
        "lr": 1e-3,
    }


def run(seed: int, cfg: JSON) -> JSON:
    data = subset(mnist5k(), cfg["train_samples"])
    out: JSON = {}
    for variant, kw in VARIANTS.items():
        model = seeded(seed, lambda kw=kw: mlp([784, 256, 256, 10], **kw))
        history = train(
            model,
            data,
            seed=seed,
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            optimizer="adam",
            eval_every=cfg["eval_every"],
        )
        result = history.to_json()
        result["gap"] = result["final_train_acc"] - result["final_test_acc"]
        out[variant] = result
    return out


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    numbers: JSON = {}
    rows = []
    for variant in VARIANTS:
        gaps = [r[variant]["gap"] for r in results]
        tests = [r[variant]["final_test_acc"] for r in results]
        trains = [r[variant]["final_train_acc"] for r in results]
        numbers[variant] = {"median_gap": median(gaps), "median_test_acc": median(tests)}
        rows.append(
            {
                "variant": variant,
                "train acc": spread(trains),
                "test acc": spread(tests),
                "gap (train − test)": spread(gaps),
            }
        )
    # Paired by seed: the same seed draws both arms' weights and their batches.
    numbers["per_seed"] = {
        "gap_difference": [r["BN"]["gap"] - r["plain"]["gap"] for r in results],
        "test_acc_difference": [
            r["BN"]["final_test_acc"] - r["plain"]["final_test_acc"] for r in results
        ],
    }
    p, b, d = numbers["plain"], numbers["BN"], numbers["dropout 0.3"]
    headline = (
        f"median train−test gap: plain {p['median_gap']:.3f}, BN {b['median_gap']:.3f}, dropout "
        f"{d['median_gap']:.3f}; median test acc: plain {p['median_test_acc']:.3f}, BN "
        f"{b['median_test_acc']:.3f}, dropout {d['median_test_acc']:.3f}"
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    return check(
        "train−test gap, BN − plain", numbers["per_seed"]["gap_difference"], -MARGIN, "below"
    ).decision()


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    steps = results[0]["plain"]["steps"]
    gaps = {
        v: [
            [tr - te for tr, te in zip(r[v]["train_acc"], r[v]["test_acc"], strict=True)]
            for r in results
        ]
        for v in VARIANTS
    }
    return [
        band_plot(
            directory / "regularization-gap.png",
            steps,
            gaps,
            title=f"Train − test accuracy, {cfg['train_samples']} training digits",
            xlabel="training step",
            ylabel="train − test accuracy",
        ),
        band_plot(
            directory / "regularization-test.png",
            steps,
            {v: [r[v]["test_acc"] for r in results] for v in VARIANTS},
            title="Test accuracy",
            xlabel="training step",
            ylabel="test accuracy",
        ),
    ]


EXPERIMENT = Experiment(
    name="regularization",
    title="A slight regularizing effect",
    claim=(
        "Batch normalization can also have a slight regularizing effect, reducing the risk of "
        "overfitting. ... However, this should not be relied upon as a primary method of "
        "regularization"
    ),
    setup=(
        "784-256-256-10 ReLU MLP on 1,000 real MNIST digits (test: 1,000 others), batch 50, "
        "Adam lr 1e-3, long enough to fit the training set; no regularization, BatchNorm1d "
        "before each ReLU, dropout 0.3 after each ReLU, and both."
    ),
    rule=(
        "Per seed: gap = final train accuracy − final test accuracy; the paired value is BN's "
        "gap − plain's. Supported if the 95% interval of its mean lies below −0.01 (BN's gap "
        "at least 1 point smaller); not supported if it lies wholly above −0.01; inconclusive "
        "otherwise. The test-accuracy difference and dropout are shown, not judged."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
)
