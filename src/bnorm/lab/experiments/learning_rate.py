"""Experiment ``learning-rate``: does batch normalization allow much higher learning rates?

A 784-100-100-10 ReLU MLP on 5,000 real MNIST digits, plain SGD at a base learning rate ×1, ×5
and ×30, with and without batch normalization. For each run: the steps until the test accuracy
reaches the best accuracy of the no-BN ×1 run of the same seed (the baseline), the final
accuracy, and whether the loss diverged (became non-finite).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data import mnist5k
from ..experiment import JSON, Experiment, Summary, Verdict, median, spread
from ..models import censored, mlp, seeded, train
from ..plots import band_plot

MULTIPLIERS = (1, 5, 30)
VARIANTS = {"no BN": False, "BN": True}
USABLE = 0.02  # a rate is usable when its median final accuracy is within 2 points of target


def config(quick: bool) -> JSON:
    return {
        "steps": 300 if quick else 1500,
        "eval_every": 25 if quick else 75,
        "batch_size": 60,
        "base_lr": 0.1,
        "multipliers": list(MULTIPLIERS),
    }


def run(seed: int, cfg: JSON) -> JSON:
    data = mnist5k()
    out: JSON = {}
    for variant, bn in VARIANTS.items():
        for mult in cfg["multipliers"]:
            model = seeded(seed, lambda bn=bn: mlp([784, 100, 100, 10], "relu", bn=bn))
            history = train(
                model,
                data,
                seed=seed,
                steps=cfg["steps"],
                batch_size=cfg["batch_size"],
                lr=cfg["base_lr"] * mult,
                eval_every=cfg["eval_every"],
            )
            out[f"{variant} ×{mult}"] = history.to_json()
    target = out["no BN ×1"]["best_test_acc"]
    for h in out.values():
        h["target"] = target
        h["first_step"] = next(
            (s for s, a in zip(h["steps"], h["test_acc"], strict=True) if a >= target), None
        )
    return out


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    steps = cfg["steps"]
    runs: JSON = {}
    rows = []
    for variant in VARIANTS:
        for mult in cfg["multipliers"]:
            key = f"{variant} ×{mult}"
            firsts = [r[key]["first_step"] for r in results]
            finals = [r[key]["final_test_acc"] for r in results]
            runs[key] = {
                "variant": variant,
                "multiplier": mult,
                "median_steps": median([censored(f, steps) for f in firsts]),
                "median_final_test_acc": median(finals),
                "diverged": sum(bool(r[key]["diverged"]) for r in results),
            }
            rows.append(
                {
                    "run": key,
                    "lr": cfg["base_lr"] * mult,
                    "steps to the baseline's best": spread(firsts, "{:.0f}"),
                    "final test acc": spread(finals),
                    "diverged": f"{runs[key]['diverged']} of {len(results)}",
                }
            )
    target = median([r["no BN ×1"]["target"] for r in results])
    numbers: JSON = {"target": target, "steps": steps, "runs": runs}
    for variant in VARIANTS:
        usable = [
            v
            for v in runs.values()
            if v["variant"] == variant
            and v["diverged"] == 0
            and v["median_final_test_acc"] >= target - USABLE
        ]
        numbers[variant] = {
            "max_usable_multiplier": max((v["multiplier"] for v in usable), default=0),
            "best_median_steps": min((v["median_steps"] for v in usable), default=steps + 1),
        }
    headline = (
        f"largest usable lr multiplier: BN ×{numbers['BN']['max_usable_multiplier']} vs no BN "
        f"×{numbers['no BN']['max_usable_multiplier']}; fewest steps to the baseline's best "
        f"({target:.3f}): BN {numbers['BN']['best_median_steps']:.0f} vs no BN "
        f"{numbers['no BN']['best_median_steps']:.0f}; diverged (no BN ×30): "
        f"{runs['no BN ×30']['diverged']} of {len(results)}"
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Verdict:
    higher = numbers["BN"]["max_usable_multiplier"] > numbers["no BN"]["max_usable_multiplier"]
    faster = numbers["BN"]["best_median_steps"] < numbers["no BN"]["best_median_steps"]
    if higher and faster:
        return "supported"
    if not higher and not faster:
        return "not supported"
    return "mixed"


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    keys = [f"{v} ×{m}" for v in VARIANTS for m in cfg["multipliers"]]
    return [
        band_plot(
            directory / "learning-rate-accuracy.png",
            results[0]["no BN ×1"]["steps"],
            {k: [r[k]["test_acc"] for r in results] for k in keys},
            title=f"Test accuracy at learning rate ×1, ×5, ×30 (base {cfg['base_lr']})",
            xlabel="training step",
            ylabel="test accuracy",
        )
    ]


EXPERIMENT = Experiment(
    name="learning-rate",
    title="Higher learning rates",
    claim=(
        "One of the most significant advantages is that it allows for much higher learning "
        "rates, accelerating the learning process."
    ),
    setup=(
        "784-100-100-10 ReLU MLP (torch's default init) on 5,000 real MNIST digits (4,000 "
        "train), batch 60, plain SGD at learning rate 0.1 (a good rate without BN) ×1, ×5, "
        "×30, with and without BatchNorm1d before each ReLU. Target: the best test accuracy "
        "of the no-BN ×1 run of the same seed."
    ),
    rule=(
        "A rate is usable for a variant when no seed diverged and the median final test "
        "accuracy is within 2 points of the target. higher = BN's largest usable multiplier > "
        "no BN's; faster = BN's fewest median steps to the target over its usable rates < no "
        "BN's. Supported if both; not supported if neither; mixed otherwise."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
)
