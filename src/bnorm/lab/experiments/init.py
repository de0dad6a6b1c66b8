"""Experiment ``init``: is a batch-normalized network less sensitive to its initial weights?

A 784-100-100-100-10 ReLU MLP on 5,000 real MNIST digits; every linear layer starts from a
He-normal initialization multiplied by a scale from 0.01 to 3 (1 = He's choice). Without batch
normalization a small scale shrinks the signal layer after layer and a large one inflates it;
batch normalization rescales every layer's input, so it should not care.
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

SCALES = (0.01, 0.1, 0.3, 1.0, 3.0)
NARROWER = 0.05  # BN's best-to-worst range over scales is five points narrower
VARIANTS = {"no BN": False, "BN": True}


def config(quick: bool) -> JSON:
    return {
        "steps": 300 if quick else 1000,
        "eval_every": 100 if quick else 250,
        "batch_size": 60,
        "lr": 0.1,
        "scales": list(SCALES),
    }


def run(seed: int, cfg: JSON) -> JSON:
    data = mnist5k()
    out: JSON = {}
    for variant, bn in VARIANTS.items():
        for scale in cfg["scales"]:
            model = seeded(
                seed, lambda bn=bn, s=scale: mlp([784, 100, 100, 100, 10], bn=bn, init_scale=s)
            )
            history = train(
                model,
                data,
                seed=seed,
                steps=cfg["steps"],
                batch_size=cfg["batch_size"],
                lr=cfg["lr"],
                eval_every=cfg["eval_every"],
            )
            out[f"{variant} {scale:g}"] = history.to_json()
    return out


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    numbers: JSON = {}
    rows = []
    for variant in VARIANTS:
        finals_by_scale = {
            f"{s:g}": median([r[f"{variant} {s:g}"]["final_test_acc"] for r in results])
            for s in cfg["scales"]
        }
        all_finals = [
            r[f"{variant} {s:g}"]["final_test_acc"] for r in results for s in cfg["scales"]
        ]
        numbers[variant] = {
            "median_final_by_scale": finals_by_scale,
            "worst": min(finals_by_scale.values()),
            "best": max(finals_by_scale.values()),
            "range": max(finals_by_scale.values()) - min(finals_by_scale.values()),
            "std_over_runs": float(np.std(all_finals)),
        }
        rows.append(
            {
                "variant": variant,
                **{
                    f"scale {s:g}": spread(
                        [r[f"{variant} {s:g}"]["final_test_acc"] for r in results]
                    )
                    for s in cfg["scales"]
                },
            }
        )

    def seed_range(r: JSON, variant: str) -> float:
        finals = [r[f"{variant} {s:g}"]["final_test_acc"] for s in cfg["scales"]]
        return max(finals) - min(finals)

    # Paired by seed: the same seed draws both arms' weights (then scaled) and their batches.
    numbers["per_seed"] = {
        "range_difference": [seed_range(r, "BN") - seed_range(r, "no BN") for r in results]
    }
    b, n = numbers["BN"], numbers["no BN"]
    headline = (
        f"median final test accuracy over init scales {cfg['scales'][0]:g}–"
        f"{cfg['scales'][-1]:g}× He: BN {b['worst']:.3f}–{b['best']:.3f} vs no BN "
        f"{n['worst']:.3f}–{n['best']:.3f}"
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    return check(
        "range over scales, BN − no BN",
        numbers["per_seed"]["range_difference"],
        -NARROWER,
        "below",
    ).decision()


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    scales = cfg["scales"]
    for variant in VARIANTS:
        y = np.array([[r[f"{variant} {s:g}"]["final_test_acc"] for s in scales] for r in results])
        (line,) = ax.plot(scales, np.median(y, axis=0), marker="o", label=variant)
        ax.fill_between(
            scales, y.min(axis=0), y.max(axis=0), alpha=0.2, lw=0, color=line.get_color()
        )
    ax.set_xscale("log")
    ax.set(
        title="Final test accuracy vs initial weight scale (× He-normal)",
        xlabel="initial weight scale (× He)",
        ylabel="final test accuracy",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = directory / "init-final-accuracy.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [path.name]


EXPERIMENT = Experiment(
    name="init",
    title="Less sensitivity to initialization",
    claim=(
        "Another benefit of batch normalization is that it makes weights easier to initialize "
        "... It reduces the sensitivity to the initial starting weights"
    ),
    setup=(
        "784-100-100-100-10 ReLU MLP on 5,000 real MNIST digits (4,000 train), batch 60, plain "
        "SGD lr 0.1, every linear layer He-normal × scale, scale ∈ {0.01, 0.1, 0.3, 1, 3}, with "
        "and without BatchNorm1d before each ReLU."
    ),
    rule=(
        "Per seed: range = best − worst final test accuracy over the five scales; the paired "
        "value is BN's range − no BN's. Supported if the 95% interval of its mean lies below "
        "−0.05 (BN's range at least 5 points narrower); not supported if it lies wholly above "
        "−0.05; inconclusive otherwise."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
)
