"""Experiment ``article``: the article's own example, with and without batch normalization.

The article's Keras network (``bnorm demo``): two noisy circles, Linear(2, 50) → ReLU →
Linear(50, 1), Adam, batch 32, 100 epochs. Its text puts the BatchNormalization layer "just
after the Dense layer and before the activation function", while its code, where ``Dense``
applies the ReLU itself, could only add it after. We train both placements and no BN, and
count the epochs until the test accuracy (eval mode) first reaches 80%.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...demo import VARIANTS, train_one
from ..experiment import JSON, Experiment, Summary, Verdict, median, spread
from ..plots import band_plot

TARGET = 0.80
FASTER = 0.75  # "faster" = reaches the target in at most 75% of no-BN's epochs


def config(quick: bool) -> JSON:
    return {"epochs": 100, "batch_size": 32, "lr": 1e-3, "target": TARGET}


def run(seed: int, cfg: JSON) -> JSON:
    out: JSON = {}
    for variant in VARIANTS:
        history = train_one(
            variant, seed, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"]
        )
        out[variant] = {
            "test_acc": history.test_acc,
            "train_acc": history.train_acc,
            "first_epoch": history.first_epoch_at(cfg["target"]),
            "seconds": history.seconds,
        }
    return out


def _censored(first: int | None, epochs: int) -> int:
    # A run that never reaches the target counts as epochs + 1, so it ranks after every run
    # that does (a censored observation; the median stays defined).
    return epochs + 1 if first is None else first


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    epochs = cfg["epochs"]
    numbers: JSON = {"epochs": epochs, "variants": {}}
    rows = []
    for variant in VARIANTS:
        firsts = [r[variant]["first_epoch"] for r in results]
        finals = [r[variant]["test_acc"][-1] for r in results]
        numbers["variants"][variant] = {
            "median_epochs": median([_censored(f, epochs) for f in firsts]),
            "never": sum(f is None for f in firsts),
            "median_final_test_acc": median(finals),
        }
        rows.append(
            {
                "variant": variant,
                f"first epoch at {TARGET:.0%} test acc": spread(firsts, "{:.0f}"),
                "final test acc": spread(finals),
            }
        )
    base = numbers["variants"]["no BN"]["median_epochs"]
    for v in numbers["variants"].values():
        v["ratio_to_no_bn"] = v["median_epochs"] / base
    parts = [
        f"{variant}: {v['median_epochs']:.0f} epochs ({v['ratio_to_no_bn']:.2f}× no BN)"
        for variant, v in numbers["variants"].items()
        if variant != "no BN"
    ]
    headline = (
        f"epochs to {TARGET:.0%} test accuracy (median over {len(results)} seeds): no BN "
        f"{base:.0f}; " + "; ".join(parts)
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Verdict:
    ratios = [v["ratio_to_no_bn"] for k, v in numbers["variants"].items() if k != "no BN"]
    faster = [r <= FASTER for r in ratios]
    if all(faster):
        return "supported"
    if not any(faster):
        return "not supported"
    return "mixed"


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    curves = {v: [r[v]["test_acc"] for r in results] for v in VARIANTS}
    steps = list(range(1, cfg["epochs"] + 1))
    return [
        band_plot(
            directory / "article-test-accuracy.png",
            steps,
            curves,
            title="The article's network on two circles: test accuracy (eval mode)",
            xlabel="epoch",
            ylabel="test accuracy",
            hline=(TARGET, f"{TARGET:.0%} target"),
        )
    ]


EXPERIMENT = Experiment(
    name="article",
    title="The article's example: does batch normalization speed up training?",
    claim=(
        "Batch normalization is a technique used in artificial intelligence (AI) and machine "
        "learning to standardize the inputs of each layer in a neural network, thereby improving "
        "its performance and stability. ... effectiveness in accelerating the training process"
    ),
    setup=(
        "The article's Keras example in PyTorch (as `bnorm demo`): make_circles(1000, noise=0.1, "
        "random_state=1), 500 train / 500 test; Linear(2,50) He-uniform → ReLU → Linear(50,1); "
        "binary cross-entropy; Adam(lr=1e-3); batch 32; 100 epochs; BN with Keras' defaults "
        "(momentum 0.01 in PyTorch's convention, eps 1e-3), placed after or before the ReLU. "
        "Test accuracy in eval mode after every epoch."
    ),
    rule=(
        "For each BN placement, ratio = median epochs to 80% test accuracy / no BN's (a run that "
        "never gets there counts as 101 epochs). A placement is faster when ratio ≤ 0.75. "
        "Supported if every placement is faster; not supported if none is; mixed otherwise."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
)
