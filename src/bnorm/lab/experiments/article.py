"""Experiment ``article``: the article's own example, with and without batch normalization.

The article's Keras network (``bnorm demo``): two noisy circles, Linear(2, 50) → ReLU →
Linear(50, 1), Adam, batch 32, 100 epochs. Its text puts the BatchNormalization layer "just
after the Dense layer and before the activation function", while its code, where ``Dense``
applies the ReLU itself, could only add it after. We train both placements and no BN, and
count the epochs until the test accuracy (eval mode) first reaches 80%. In full runs the
article's own Keras code runs beside it (:mod:`bnorm.lab.keras_anchor`) as an anchor.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...demo import VARIANTS, load_circles, train_one
from ..experiment import JSON, Decision, Experiment, Summary, all_of, check, median, spread
from ..plots import band_plot
from ..verdict import t_interval

TARGET = 0.80
FASTER = 0.75  # "faster" = reaches the target in at most 75% of no-BN's epochs


@functools.cache
def keras_version() -> str | None:
    """The Keras version the anchor runs with, None when it cannot run (see keras_anchor)."""
    from ..keras_anchor import keras_status

    keras, version = keras_status()
    return version if keras is not None else None


def keras_missing_reason() -> str:
    from ..keras_anchor import keras_status

    return keras_status()[1]


def config(quick: bool) -> JSON:
    # The Keras anchor runs in full runs only: three more trainings per seed at Keras' pace
    # do not fit the quick run's budget (its own test runs it on two epochs).
    return {
        "epochs": 100,
        "batch_size": 32,
        "lr": 1e-3,
        "target": TARGET,
        "keras_anchor": not quick,
        "keras": None if quick else keras_version(),
    }


def run(seed: int, cfg: JSON) -> JSON:
    out: JSON = {}
    data = load_circles()
    for variant in VARIANTS:
        history = train_one(
            variant,
            seed,
            epochs=cfg["epochs"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            data=data,
        )
        out[variant] = {
            "test_acc": history.test_acc,
            "train_acc": history.train_acc,
            "first_epoch": history.first_epoch_at(cfg["target"]),
            "seconds": history.seconds,
        }
    if cfg.get("keras"):
        from ..keras_anchor import train_keras

        out["keras"] = {
            variant: train_keras(
                variant,
                seed,
                epochs=cfg["epochs"],
                batch_size=cfg["batch_size"],
                data=data,
                target=cfg["target"],
            )
            for variant in VARIANTS
        }
    return out


def _censored(first: int | None, epochs: int) -> int:
    # A run that never reaches the target counts as epochs + 1, so it ranks after every run
    # that does (a censored observation; the mean and the interval stay defined).
    return epochs + 1 if first is None else first


def _interval(values: Sequence[float]) -> JSON:
    mean, low, high = t_interval(values)
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    epochs = cfg["epochs"]
    numbers: JSON = {"epochs": epochs, "variants": {}}
    rows = []
    frameworks = [("PyTorch (bnorm)", lambda r: r)]
    if cfg.get("keras") and all("keras" in r for r in results):
        frameworks.append((f"Keras {cfg['keras']} (torch backend)", lambda r: r["keras"]))
    for framework, runs_of in frameworks:
        for variant in VARIANTS:
            firsts = [runs_of(r)[variant]["first_epoch"] for r in results]
            finals = [runs_of(r)[variant]["test_acc"][-1] for r in results]
            rows.append(
                {
                    "framework": framework,
                    "variant": variant,
                    f"first epoch at {TARGET:.0%} test acc (median [min–max])": spread(
                        firsts, "{:.0f}"
                    ),
                    "final test acc (median [min–max])": spread(finals),
                }
            )
    for variant in VARIANTS:
        firsts = [r[variant]["first_epoch"] for r in results]
        numbers["variants"][variant] = {
            "median_epochs": median([_censored(f, epochs) for f in firsts]),
            "never": sum(f is None for f in firsts),
            "median_final_test_acc": median([r[variant]["test_acc"][-1] for r in results]),
        }
    # Paired by seed: the same seed draws both arms' weights and the same batch order.
    numbers["per_seed"] = {
        f"{variant} / no BN epochs": [
            _censored(r[variant]["first_epoch"], epochs)
            / _censored(r["no BN"]["first_epoch"], epochs)
            for r in results
        ]
        for variant in VARIANTS
        if variant != "no BN"
    }
    if len(frameworks) == 2:
        # The anchor: Keras − PyTorch per seed (same data, seed and batches), not judged.
        numbers["keras"] = {
            "version": cfg["keras"],
            "variants": {
                variant: {
                    "final_test_acc_difference": _interval(
                        [
                            r["keras"][variant]["test_acc"][-1] - r[variant]["test_acc"][-1]
                            for r in results
                        ]
                    ),
                    "epochs_difference": _interval(
                        [
                            _censored(r["keras"][variant]["first_epoch"], epochs)
                            - _censored(r[variant]["first_epoch"], epochs)
                            for r in results
                        ]
                    ),
                }
                for variant in VARIANTS
            },
        }
    else:
        numbers["keras"] = {
            "version": None,
            "reason": keras_missing_reason()
            if cfg.get("keras_anchor")
            else "the Keras anchor runs in full runs only (quick runs skip it)",
        }
    v = numbers["variants"]
    notes = [anchor_note(numbers["keras"], len(results))]
    headline = f"median epochs to {TARGET:.0%} test accuracy: " + ", ".join(
        f"{variant} {v[variant]['median_epochs']:.0f}" for variant in VARIANTS
    )
    return Summary(numbers, headline, rows, notes)


def anchor_note(anchor: Mapping[str, Any], seeds: int) -> str:
    """The Keras anchor in words: Keras − PyTorch per variant, with 95% t-intervals."""
    if not anchor.get("version"):
        return f"Keras anchor: not run — {anchor['reason']}."

    def text(d: Mapping[str, Any], fmt: str) -> str:
        if d["low"] is None or d["high"] is None or d["n"] < 2:
            return fmt.format(d["mean"])
        return f"{fmt.format(d['mean'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"

    parts = [
        f"{variant}: final test accuracy {text(d['final_test_acc_difference'], '{:+.3f}')}, "
        f"epochs to {TARGET:.0%} {text(d['epochs_difference'], '{:+.1f}')}"
        for variant, d in anchor["variants"].items()
    ]
    return (
        f"Keras anchor (the article's code on Keras {anchor['version']}, torch backend; same "
        f"data, seeds and batches; {seeds} seeds). Keras − PyTorch, mean per seed with its 95% "
        "t-interval — " + "; ".join(parts) + ". An interval containing 0 means the reproduction "
        "and the original agree within what these seeds can tell; Keras draws its own initial "
        "weights, so single runs differ."
    )


def decide(numbers: Mapping[str, Any]) -> Decision:
    return all_of(
        *(
            check(f"epochs to {TARGET:.0%}, {key}", values, FASTER, "below", "{:.2f}")
            for key, values in numbers["per_seed"].items()
        )
    )


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
        "Per seed and BN placement: ratio = epochs to 80% test accuracy with BN / without (a "
        "run that never gets there counts as 101 epochs). Supported if, for both placements, "
        "the 95% interval of the mean ratio lies below 0.75; not supported if either lies "
        "wholly above 0.75; inconclusive otherwise. The Keras anchor (the article's own code "
        "on Keras' torch backend, same data, seeds and batches) is shown, not judged."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
    max_seeds=(3, 8),
)
