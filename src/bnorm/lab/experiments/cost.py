"""Experiment ``cost``: what batch normalization costs in compute, and what bnorm takes back.

A small convolutional network on a (64, 3, 32, 32) batch: the time of one training step
(forward, backward, SGD update) without batch normalization, with torch's BatchNorm2d and with
bnorm's; and the time of one inference forward with batch norm vs the same network folded by
``bnorm.fold``. Timed in one process, the variants alternating within every repeat (the order
rotating), and summarized as medians of pair-by-pair ratios, so a slow moment of the machine
hits every variant alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from torch import nn

from ...tools import convert, fold
from ..experiment import JSON, Decision, Experiment, Summary, check, median
from ..models import seeded

COSTS = 1.05  # BN "adds cost" when its training step takes ≥ 5% longer


def convnet(bn: bool) -> nn.Sequential:
    """3 conv blocks (32, 64, 64 channels; conv → [BatchNorm2d] → ReLU), pooled, linear head."""

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not bn)
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU()] if bn else [conv, nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1),
        *block(32, 64, 2),
        *block(64, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _timer(fn: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _alternate(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            times[n].append(fns[n]())
    return times


def config(quick: bool) -> JSON:
    return {"batch": 64, "image": 32, "warmup": 3, "repeats": 8 if quick else 30}


def run(seed: int, cfg: JSON) -> JSON:
    x = torch.randn(
        cfg["batch"], 3, cfg["image"], cfg["image"], generator=torch.Generator().manual_seed(seed)
    )
    y = torch.randint(0, 10, (cfg["batch"],), generator=torch.Generator().manual_seed(seed))
    plain = seeded(seed, lambda: convnet(False))
    with_torch_bn = seeded(seed, lambda: convnet(True))
    with_bnorm_bn = convert(seeded(seed, lambda: convnet(True)), to="bnorm")
    train_fns = {
        "no BN": _timer(_train_step(plain, x, y)),
        "torch BN": _timer(_train_step(with_torch_bn, x, y)),
        "bnorm BN": _timer(_train_step(with_bnorm_bn, x, y)),
    }
    _alternate(train_fns, cfg["warmup"])
    train_times = _alternate(train_fns, cfg["repeats"])
    evaluated = with_torch_bn.eval()
    folded = fold(evaluated)
    with torch.no_grad():
        max_diff = float((folded(x) - evaluated(x)).abs().max())
        infer_fns = {"BN": _timer(lambda: evaluated(x)), "folded": _timer(lambda: folded(x))}
        _alternate(infer_fns, cfg["warmup"])
        infer_times = _alternate(infer_fns, cfg["repeats"])

    def ratios(a: list[float], b: list[float]) -> list[float]:
        return [p / q for p, q in zip(a, b, strict=True)]

    t = train_times
    return {
        "threads": torch.get_num_threads(),
        "train_ms": {k: statistics.median(v) * 1e3 for k, v in t.items()},
        "infer_ms": {k: statistics.median(v) * 1e3 for k, v in infer_times.items()},
        "bn_over_plain": statistics.median(ratios(t["torch BN"], t["no BN"])),
        "bnorm_over_plain": statistics.median(ratios(t["bnorm BN"], t["no BN"])),
        "torch_over_bnorm": statistics.median(ratios(t["torch BN"], t["bnorm BN"])),
        "bn_over_folded": statistics.median(ratios(infer_times["BN"], infer_times["folded"])),
        "fold_max_abs_diff": max_diff,
    }


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    keys = ("bn_over_plain", "bnorm_over_plain", "torch_over_bnorm", "bn_over_folded")
    numbers: JSON = {k: median([r[k] for r in results]) for k in keys}
    numbers["threads"] = results[0]["threads"]
    # Paired within each seed: both models timed side by side on the same tensors.
    numbers["per_seed"] = {"bn_over_plain": [r["bn_over_plain"] for r in results]}
    rows = [
        {
            "step": f"training, {name}",
            "median ms": f"{median([r['train_ms'][name] for r in results]):.2f}",
        }
        for name in results[0]["train_ms"]
    ] + [
        {
            "step": f"inference, {name}",
            "median ms": f"{median([r['infer_ms'][name] for r in results]):.2f}",
        }
        for name in results[0]["infer_ms"]
    ]
    headline = (
        f"median over seeds: training step with bnorm's BN / without BN "
        f"{numbers['bnorm_over_plain']:.2f}× (torch's BN / bnorm's "
        f"{numbers['torch_over_bnorm']:.2f}×); inference BN / folded "
        f"{numbers['bn_over_folded']:.2f}× ({numbers['threads']} thread(s))"
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    return check(
        "training step with BN / without BN",
        numbers["per_seed"]["bn_over_plain"],
        COSTS,
        "above",
        "{:.3f}",
    ).decision()


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, key, title in ((a, "train_ms", "training step"), (b, "infer_ms", "inference")):
        names = list(results[0][key])
        values = [[r[key][n] for r in results] for n in names]
        ax.bar(names, [statistics.median(v) for v in values], color="#8ab")
        for i, v in enumerate(values):
            ax.plot([i] * len(v), v, "k.", ms=4)
        ax.set(
            title=f"{title} (batch {cfg['batch']}×3×{cfg['image']}×{cfg['image']})",
            ylabel="ms (median per seed)",
        )
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = directory / "cost.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [path.name]


EXPERIMENT = Experiment(
    name="cost",
    title="Computational cost",
    claim=(
        "One of the main drawbacks is that it adds computational complexity to the model. The "
        "need to calculate means and variances for each mini-batch and to apply the "
        "normalization operation at each layer can slow down computation, particularly during "
        "the training phase."
    ),
    setup=(
        "3-block conv net (32/64/64 channels, 3×3 convs, ReLU, average pool, linear) on a "
        "random (64, 3, 32, 32) batch; one SGD training step without BN, with torch's "
        "BatchNorm2d, with bnorm's (bnorm.convert); inference with BN vs bnorm.fold. Variants "
        "alternate within each repeat; medians of pair-by-pair ratios; threads as the lab runs."
    ),
    rule=(
        "Per seed: r = median over repeats of the ratio (training step with torch's BN) / "
        "(without BN), timed side by side. Supported if the 95% interval of the mean r lies "
        "above 1.05; not supported if it lies wholly below 1.05; inconclusive otherwise. "
        "bnorm-vs-torch and folding are reported, not judged."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 3),
    max_seeds=(3, 6),
)
