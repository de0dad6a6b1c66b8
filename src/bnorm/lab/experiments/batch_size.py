"""Experiment ``batch-size``: batch normalization's dependence on the batch size, and remedies.

A small 1-D CNN on MNIST-1D (sequences of 40 values, 10 classes) trained at batch sizes from
2 to 128 with the same number of samples seen, with five normalizations after each
convolution: BatchNorm, Batch Renormalization, Ghost BatchNorm, GroupNorm and LayerNorm. The
published pattern (Wu & He 2018, GroupNorm): batch norm's error climbs as the batch shrinks
while group norm stays flat. Learning rate follows the linear scaling rule (lr ∝ batch), so
every batch size takes comparable steps through the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from torch import nn

from ...modules import BatchNorm1d, BatchRenorm1d, GhostBatchNorm1d
from ..data import mnist1d
from ..experiment import JSON, Decision, Experiment, Summary, check, median, spread
from ..models import seeded, train

GHOST = 8  # Ghost BN's virtual batch: equal to BN at batches ≤ 8, smaller groups above

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "BatchNorm": lambda c: BatchNorm1d(c),
    "BatchRenorm": lambda c: BatchRenorm1d(c, r_max=3.0, d_max=5.0),
    "GhostBatchNorm": lambda c: GhostBatchNorm1d(c, virtual_batch_size=GHOST),
    "GroupNorm": lambda c: nn.GroupNorm(8, c),
    "LayerNorm": lambda c: nn.GroupNorm(1, c),  # LayerNorm over (channels, positions)
}
LOSS = 0.05  # BN loses five points against GroupNorm from the largest batch to the smallest


def cnn(norm: Callable[[int], nn.Module], channels: int = 32) -> nn.Sequential:
    """(N, 40) → (N, 1, 40) → three conv blocks (conv → norm → ReLU) → linear classifier."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, channels, 5, padding=2, bias=False),
        norm(channels),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 5, stride=2, padding=2, bias=False),
        norm(channels),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1, bias=False),
        norm(channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 10, 10),
    )


def config(quick: bool) -> JSON:
    # Quick runs keep two norms and two batch sizes: at batch 2 every step is pure overhead.
    return {
        "batch_sizes": [2, 32] if quick else [2, 4, 8, 32, 128],
        "samples": 3000 if quick else 6000,
        "lr_per_sample": 0.1 / 32,  # SGD with momentum 0.9, lr = batch × this
        "norms": ["BatchNorm", "GroupNorm"] if quick else list(NORMS),
    }


def run(seed: int, cfg: JSON) -> JSON:
    data = mnist1d()
    out: JSON = {}
    for name in cfg["norms"]:
        for batch in cfg["batch_sizes"]:
            steps = cfg["samples"] // batch
            model = seeded(seed, lambda name=name: cnn(NORMS[name]))
            history = train(
                model,
                data,
                seed=seed,
                steps=steps,
                batch_size=batch,
                lr=cfg["lr_per_sample"] * batch,
                optimizer="momentum",
                eval_every=steps,
            )
            out[f"{name} {batch}"] = {
                "final_test_acc": history.test_acc[-1],
                "diverged": history.diverged,
                "seconds": history.seconds,
            }
    return out


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    small, large = cfg["batch_sizes"][0], cfg["batch_sizes"][-1]
    numbers: JSON = {"small": small, "large": large, "norms": {}}
    rows = []
    for name in cfg["norms"]:
        acc = {
            str(b): median([r[f"{name} {b}"]["final_test_acc"] for r in results])
            for b in cfg["batch_sizes"]
        }
        numbers["norms"][name] = {"median_acc_by_batch": acc}
        rows.append(
            {
                "normalization": name,
                **{
                    f"batch {b}": spread([r[f"{name} {b}"]["final_test_acc"] for r in results])
                    for b in cfg["batch_sizes"]
                },
            }
        )
    bn, gn = (numbers["norms"][k]["median_acc_by_batch"] for k in ("BatchNorm", "GroupNorm"))
    # GroupNorm does not depend on the batch, so BN − GN at each batch size isolates what BN's
    # batch statistics cost or bring, whatever else (steps, learning rate) changes with batch.
    numbers["bn_minus_gn"] = {str(b): bn[str(b)] - gn[str(b)] for b in cfg["batch_sizes"]}

    def seed_gap(r: JSON, b: int) -> float:
        return r[f"BatchNorm {b}"]["final_test_acc"] - r[f"GroupNorm {b}"]["final_test_acc"]

    # Paired by seed: every arm starts from the seed's weights and sees the seed's batches.
    numbers["per_seed"] = {"gap_change": [seed_gap(r, small) - seed_gap(r, large) for r in results]}
    gap = numbers["bn_minus_gn"]
    headline = (
        f"median BN − GroupNorm test accuracy: {gap[str(large)]:+.3f} at batch {large}, "
        f"{gap[str(small)]:+.3f} at batch {small}; at batch {small}: BN {bn[str(small)]:.3f}, "
        f"GN {gn[str(small)]:.3f}"
        + "".join(
            f", {k} {v['median_acc_by_batch'][str(small)]:.3f}"
            for k, v in numbers["norms"].items()
            if k not in ("BatchNorm", "GroupNorm")
        )
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    return check(
        f"(BN − GN) at batch {numbers['small']} − (BN − GN) at batch {numbers['large']}",
        numbers["per_seed"]["gap_change"],
        -LOSS,
        "below",
    ).decision()


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    batches = cfg["batch_sizes"]
    for name in cfg["norms"]:
        y = np.array([[r[f"{name} {b}"]["final_test_acc"] for b in batches] for r in results])
        (line,) = ax.plot(batches, np.median(y, axis=0), marker="o", label=name)
        ax.fill_between(
            batches, y.min(axis=0), y.max(axis=0), alpha=0.15, lw=0, color=line.get_color()
        )
    ax.set_xscale("log", base=2)
    ax.set(
        title=f"MNIST-1D CNN: test accuracy vs batch size ({cfg['samples']} samples seen)",
        xlabel="batch size",
        ylabel="test accuracy (eval mode)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = directory / "batch-size.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [path.name]


EXPERIMENT = Experiment(
    name="batch-size",
    title="Dependence on batch size, and the remedies",
    claim=(
        "Batch normalization depends on the batch size used during training. Small batch sizes "
        "can lead to inaccurate estimates of the mean and variance, leading to unstable "
        "training."
    ),
    setup=(
        "1-D CNN (3 × conv(32) → norm → ReLU, linear head) on MNIST-1D (4,000 train, 1,000 "
        "test), the same number of samples seen at every batch size (quick: batches 2 and 32 "
        "and 3,000 samples, BatchNorm and GroupNorm only; full: 2, 4, 8, 32, 128 and 6,000), "
        "SGD momentum 0.9 with lr = 0.1 × batch / 32. Norms: BatchNorm, BatchRenorm (r_max 3, "
        "d_max 5 from the first step), GhostBatchNorm (virtual batch 8), GroupNorm (8 groups), "
        "LayerNorm (GroupNorm with 1 group). Accuracy in eval mode."
    ),
    rule=(
        "Per seed: gap(b) = BatchNorm's − GroupNorm's final test accuracy at batch b (GroupNorm "
        "does not depend on the batch, so the gap isolates BN's batch statistics from "
        "everything else that changes with the batch size); the paired value is gap(smallest) "
        "− gap(largest). Supported if the 95% interval of its mean lies below −0.05 (BN loses "
        "at least 5 points more at the smallest batch); not supported if it lies wholly above "
        "−0.05; inconclusive otherwise. Renorm, Ghost and LayerNorm are shown, not judged."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 3),
    max_seeds=(3, 6),
)
