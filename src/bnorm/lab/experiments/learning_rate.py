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
from ..experiment import JSON, Decision, Experiment, Summary, all_of, check, median, spread
from ..models import censored, mlp, seeded, train
from ..plots import band_plot

MULTIPLIERS = (1, 5, 30)
VARIANTS = {"no BN": False, "BN": True}
HIGHER = 0.05  # BN's accuracy at the highest rate beats no BN's by five points
CHANCE = 0.1  # ten classes
FAILED = CHANCE + 0.05  # a run "failed": non-finite loss, or final accuracy this close to chance


def failed(run: Mapping[str, Any]) -> bool:
    """A run failed when its loss became non-finite or it ended at (near) chance accuracy."""
    acc = run["final_test_acc"]
    return bool(run["diverged"]) or acc is None or acc <= FAILED


def final_accuracy(run: Mapping[str, Any]) -> float:
    """The final test accuracy, chance for a run whose loss became non-finite."""
    acc = run["final_test_acc"]
    return CHANCE if run["diverged"] or acc is None else float(acc)


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
                "failed": sum(failed(r[key]) for r in results),
            }
            rows.append(
                {
                    "run": key,
                    "lr": cfg["base_lr"] * mult,
                    "steps to the baseline's best": spread(firsts, "{:.0f}"),
                    "final test acc": spread(finals),
                    "failed (non-finite loss or ≤ 15% acc)": f"{runs[key]['failed']} of "
                    f"{len(results)}",
                }
            )
    target = median([r["no BN ×1"]["target"] for r in results])
    top = max(cfg["multipliers"])

    def fewest_steps(r: JSON, variant: str) -> int:
        return min(censored(r[f"{variant} ×{m}"]["first_step"], steps) for m in cfg["multipliers"])

    numbers: JSON = {
        "target": target,
        "steps": steps,
        "top_multiplier": top,
        "runs": runs,
        # Paired by seed: same initial weights and batches for both arms at every rate.
        "per_seed": {
            "top_rate_acc_difference": [
                final_accuracy(r[f"BN ×{top}"]) - final_accuracy(r[f"no BN ×{top}"])
                for r in results
            ],
            "fewest_steps_ratio": [
                fewest_steps(r, "BN") / fewest_steps(r, "no BN") for r in results
            ],
        },
    }
    bn_top, plain_top = runs[f"BN ×{top}"], runs[f"no BN ×{top}"]
    headline = (
        f"final test acc at lr ×{top} (median): BN {bn_top['median_final_test_acc']:.3f}"
        f" vs no BN {plain_top['median_final_test_acc']:.3f}; failed runs at ×{top}: "
        f"BN {bn_top['failed']} of {len(results)}, no BN {plain_top['failed']} of {len(results)}"
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    per_seed = numbers["per_seed"]
    return all_of(
        check(
            f"final test acc at lr ×{numbers['top_multiplier']}, BN − no BN",
            per_seed["top_rate_acc_difference"],
            HIGHER,
            "above",
        ),
        check(
            "fewest steps to target over rates, BN / no BN",
            per_seed["fewest_steps_ratio"],
            1.0,
            "below",
            "{:.2f}",
        ),
    )


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
        "Per seed: higher = BN's − no BN's final test accuracy at the highest rate (×30; a run "
        "whose loss became non-finite counts as chance, 10%); faster = BN's / no BN's fewest "
        "steps to the target over all rates (never = steps + 1). Supported if the 95% "
        "intervals of the means lie above +0.05 (higher) and below 1.0 (faster); not supported "
        "if either lies wholly on the other side; inconclusive otherwise. A run counts as "
        "failed when its loss became non-finite or it ended at ≤ 15% test accuracy."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
)
