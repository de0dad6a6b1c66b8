"""Experiment ``sigmoid``: does batch normalization make saturating nonlinearities trainable?

Sigmoid MLPs of width 64 with 3 to 8 hidden layers on 5,000 real MNIST digits, plain SGD,
torch's default initialization, with and without batch normalization before every sigmoid.
Deep sigmoid networks saturate and their gradients vanish; a network counts as trainable when
it reaches 80% test accuracy within the step budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from ..data import mnist5k
from ..experiment import JSON, Decision, Experiment, Summary, check, median, spread
from ..models import mlp, seeded, train

VARIANTS = {"no BN": False, "BN": True}
TRAINABLE = 0.80
BETTER = 0.05  # BN's deepest network beats no BN's by five points of accuracy


def config(quick: bool) -> JSON:
    return {
        "depths": [3, 8] if quick else [3, 4, 6, 8],
        "width": 64,
        "steps": 300 if quick else 1200,
        "eval_every": 100 if quick else 300,
        "batch_size": 60,
        "lr": 0.5,
    }


def run(seed: int, cfg: JSON) -> JSON:
    data = mnist5k()
    out: JSON = {}
    for variant, bn in VARIANTS.items():
        for depth in cfg["depths"]:
            sizes = [784] + [cfg["width"]] * depth + [10]
            model = seeded(seed, lambda bn=bn, sizes=sizes: mlp(sizes, "sigmoid", bn=bn))
            history = train(
                model,
                data,
                seed=seed,
                steps=cfg["steps"],
                batch_size=cfg["batch_size"],
                lr=cfg["lr"],
                eval_every=cfg["eval_every"],
            )
            out[f"{variant} {depth}"] = history.to_json()
    return out


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    numbers: JSON = {"depths": cfg["depths"]}
    rows = []
    for variant in VARIANTS:
        medians = {}
        for depth in cfg["depths"]:
            medians[str(depth)] = median(
                [r[f"{variant} {depth}"]["final_test_acc"] for r in results]
            )
        numbers[variant] = {
            "median_final_by_depth": medians,
            "trainable_depths": [d for d in cfg["depths"] if medians[str(d)] >= TRAINABLE],
        }
        rows.append(
            {
                "variant": variant,
                **{
                    f"{d} hidden layers": spread(
                        [r[f"{variant} {d}"]["final_test_acc"] for r in results]
                    )
                    for d in cfg["depths"]
                },
            }
        )
    deepest = cfg["depths"][-1]
    numbers["deepest"] = deepest
    # Paired by seed: the same seed draws both arms' weights and their batches.
    numbers["per_seed"] = {
        "deepest_acc_difference": [
            r[f"BN {deepest}"]["final_test_acc"] - r[f"no BN {deepest}"]["final_test_acc"]
            for r in results
        ]
    }
    b, n = numbers["BN"], numbers["no BN"]
    headline = (
        f"depths (of {cfg['depths']}) whose median final test accuracy reaches {TRAINABLE:.0%}: "
        f"BN {b['trainable_depths']} vs no BN {n['trainable_depths']}"
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    return check(
        f"final test acc at {numbers['deepest']} hidden layers, BN − no BN",
        numbers["per_seed"]["deepest_acc_difference"],
        BETTER,
        "above",
    ).decision()


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    depths = cfg["depths"]
    for variant in VARIANTS:
        y = np.array([[r[f"{variant} {d}"]["final_test_acc"] for d in depths] for r in results])
        (line,) = ax.plot(depths, np.median(y, axis=0), marker="o", label=variant)
        ax.fill_between(
            depths, y.min(axis=0), y.max(axis=0), alpha=0.2, lw=0, color=line.get_color()
        )
    ax.axhline(TRAINABLE, color="grey", ls="--", lw=1, label=f"{TRAINABLE:.0%} (trainable)")
    ax.set(
        title=f"Sigmoid MLPs (width {cfg['width']}): final test accuracy vs depth",
        xlabel="hidden layers",
        ylabel="final test accuracy",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = directory / "sigmoid-depth.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [path.name]


EXPERIMENT = Experiment(
    name="sigmoid",
    title="Saturating nonlinearities become usable",
    claim=(
        "Moreover, batch normalization allows us to use saturating nonlinearities by ensuring "
        "that the activation function doesn't get stuck in the saturated mode, thus improving "
        "the performance of the network."
    ),
    setup=(
        "Sigmoid MLPs, width 64, 3 to 8 hidden layers (quick: 3 and 8), on 5,000 real MNIST "
        "digits (4,000 train), batch 60, plain SGD lr 0.5, torch's default initialization, with "
        "and without BatchNorm1d before every sigmoid."
    ),
    rule=(
        "Per seed: BN's − no BN's final test accuracy at the deepest network (8 hidden "
        "layers). Supported if the 95% interval of its mean lies above +0.05; not supported if "
        "it lies wholly below +0.05; inconclusive otherwise. Which depths reach 80% is shown, "
        "not judged."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
)
