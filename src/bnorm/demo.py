"""The article's example, run as the article describes it: ``bnorm demo``.

The article builds a small Keras network for the two-circles problem and says it adds a
BatchNormalization layer "just after the Dense layer and before the activation" -- but its code
forgets the layer, and since Keras' ``Dense(..., activation='relu')`` applies the ReLU itself,
a layer added after it would normalize *after* the activation. So three variants are trained:

- ``no BN``: Dense(50, relu) -> Dense(1, sigmoid), the code as printed;
- ``BN after ReLU``: what ``model.add(BatchNormalization())`` after that Dense layer does;
- ``BN before ReLU``: what the article's text says, and what Ioffe & Szegedy recommend.

Setup (the article's, in PyTorch): ``make_circles(n_samples=1000, noise=0.1, random_state=1)``,
first 500 points to train and last 500 to test; Linear(2, 50) with He-uniform init, Linear(50, 1)
with Glorot-uniform init (Keras' default), zero biases; binary cross-entropy on a sigmoid
output; Adam with Keras' defaults (lr 1e-3, epsilon 1e-7); batch 32, shuffled each epoch; 100
epochs. The batch-norm layer uses Keras' defaults too: a moving-average *decay* of 0.99, which is
PyTorch's ``momentum=0.01`` (:func:`bnorm.reference.keras_momentum`), and ``eps=1e-3``.
Accuracy is measured in evaluation mode (running statistics) after every epoch, as Keras'
``evaluate`` does.

Under ``torchrun --standalone --nproc-per-node N -m bnorm demo`` the same runs are trained
data-parallel: DistributedDataParallel over gloo, the batch norms converted to
:class:`bnorm.SyncBatchNorm`, each rank training on its shard of every global batch of 32 (see
:func:`train_one`); rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as bd
from .modules import BatchNorm1d
from .reference import keras_momentum

__all__ = [
    "VARIANTS",
    "DemoResult",
    "RunHistory",
    "build_model",
    "load_circles",
    "run_command",
    "run_demo",
    "train_one",
]

VARIANTS: dict[str, str | None] = {
    "no BN": None,
    "BN after ReLU": "after",
    "BN before ReLU": "before",
}
KERAS_BN_MOMENTUM = keras_momentum(0.99)
KERAS_BN_EPS = 1e-3
TARGET_ACCURACY = 0.80


def load_circles() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The article's data: two noisy concentric circles, 500 train and 500 test points."""
    try:
        from sklearn.datasets import make_circles
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "bnorm demo needs scikit-learn and matplotlib: pip install 'bnorm[lab]'"
        ) from err
    x, y = make_circles(n_samples=1000, noise=0.1, random_state=1)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    return x[:500], y[:500], x[500:], y[500:]


def build_model(variant: str | None, hidden: int = 50) -> nn.Sequential:
    """Linear(2, hidden) -> [BN] -> ReLU -> [BN] -> Linear(hidden, 1); the sigmoid is in the loss.

    ``variant`` is ``None``, ``"after"`` or ``"before"`` (where the batch norm sits).
    """
    if variant not in (None, "before", "after"):
        raise ValueError(f"variant must be None, 'before' or 'after', got {variant!r}")
    first = nn.Linear(2, hidden)
    nn.init.kaiming_uniform_(first.weight, nonlinearity="relu")  # Keras' he_uniform
    nn.init.zeros_(first.bias)
    last = nn.Linear(hidden, 1)
    nn.init.xavier_uniform_(last.weight)  # Keras' default glorot_uniform
    nn.init.zeros_(last.bias)
    layers: list[nn.Module] = [first, nn.ReLU()]
    if variant is not None:
        bn = BatchNorm1d(hidden, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)
        layers.insert(1 if variant == "before" else 2, bn)
    return nn.Sequential(*layers, last)


@dataclass
class RunHistory:
    """Accuracies after each epoch of one training run (evaluation mode)."""

    variant: str
    seed: int
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def first_epoch_at(self, target: float = TARGET_ACCURACY) -> int | None:
        """The first epoch (1-based) whose test accuracy reaches ``target``, or None."""
        return next((i + 1 for i, a in enumerate(self.test_acc) if a >= target), None)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = ((model(x) > 0).float() == y).float().mean().item()
    model.train(was_training)
    return acc


def train_one(
    variant: str,
    seed: int,
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    data: tuple[torch.Tensor, ...] | None = None,
    on_epoch=None,
    *,
    distributed: bool | None = None,
) -> RunHistory:
    """Train one variant (a key of :data:`VARIANTS`) from one seed; return its history.

    ``distributed`` (default: whether torch.distributed is initialized with more than one
    process, e.g. under torchrun) trains data-parallel: the batch-norm layers become
    :class:`bnorm.SyncBatchNorm`, the model is wrapped in DistributedDataParallel
    (:func:`bnorm.distributed.prepare_model`), every rank draws the same global batch of
    ``batch_size`` and trains on its shard (:func:`bnorm.distributed.shard`), and the loss is
    scaled so that the gradient is the global batch's mean, exactly as one process would
    compute it. Every rank returns the same history.
    """
    xtr, ytr, xte, yte = data if data is not None else load_circles()
    if distributed is None:
        distributed = bd.world_size() > 1
    torch.manual_seed(seed)
    model = build_model(VARIANTS[variant])
    if distributed:
        model = bd.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-7)
    # sigmoid + binary cross-entropy, computed stably; distributed: a sum, scaled below
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum" if distributed else "mean")
    order = torch.Generator().manual_seed(seed)
    history = RunHistory(variant=variant, seed=seed)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=order).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            if distributed:
                mine = bd.shard(idx)
                scale = bd.global_mean_loss_scale(len(mine), len(idx))
                loss = loss_fn(model(xtr[mine]), ytr[mine]) * scale
            else:
                loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            optimizer.step()
        # Evaluate the inner model: eval mode needs no collective, and every rank agrees.
        history.train_acc.append(_accuracy(bd.unwrap(model), xtr, ytr))
        history.test_acc.append(_accuracy(bd.unwrap(model), xte, yte))
        if on_epoch is not None:
            on_epoch()
    history.seconds = time.perf_counter() - start
    return history


@dataclass
class DemoResult:
    runs: list[RunHistory]
    epochs: int
    seeds: list[int]

    def by_variant(self) -> dict[str, list[RunHistory]]:
        out: dict[str, list[RunHistory]] = {v: [] for v in VARIANTS}
        for run in self.runs:
            out[run.variant].append(run)
        return {k: v for k, v in out.items() if v}

    def summary(self) -> list[dict[str, object]]:
        """One row per variant: medians and ranges over seeds."""
        rows = []
        for variant, runs in self.by_variant().items():
            firsts = [r.first_epoch_at() for r in runs]
            rows.append(
                {
                    "variant": variant,
                    "train_acc": [r.train_acc[-1] for r in runs],
                    "test_acc": [r.test_acc[-1] for r in runs],
                    "first_epoch_80": firsts,
                    "seconds": [r.seconds for r in runs],
                }
            )
        return rows

    def table(self) -> str:
        """A markdown table: median [min-max] over seeds."""
        head = (
            f"| variant | train acc | test acc | first epoch at {TARGET_ACCURACY:.0%} test acc "
            "| seconds per run |\n|---|---|---|---|---|"
        )
        lines = [head]
        for row in self.summary():
            lines.append(
                f"| {row['variant']} | {_spread(row['train_acc'], '.3f')} "
                f"| {_spread(row['test_acc'], '.3f')} | {_epochs_text(row['first_epoch_80'])} "
                f"| {_spread(row['seconds'], '.2f')} |"
            )
        return "\n".join(lines)


def _spread(values: Sequence[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{med:{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def _epochs_text(firsts: Sequence[int | None]) -> str:
    # "never" counts as later than any epoch, so the median is honest about runs that fail.
    values = [math.inf if f is None else f for f in firsts]
    med = statistics.median_low(values)
    never = sum(f is None for f in firsts)
    reached = [f for f in firsts if f is not None]
    text = "never" if med == math.inf else f"{med:g}"
    if len(firsts) > 1 and reached:
        text += f" [{min(reached)}–{max(reached)}]"
    if never:
        text += f" ({never} of {len(firsts)} never)"
    return text


def plot_curves(result: DemoResult, path: Path) -> Path:
    """Test accuracy per epoch: the median over seeds, shaded between min and max."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    epochs = np.arange(1, result.epochs + 1)
    for variant, runs in result.by_variant().items():
        acc = np.array([r.test_acc for r in runs])
        line = ax.plot(epochs, np.median(acc, axis=0), label=variant)[0]
        ax.fill_between(epochs, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.axhline(TARGET_ACCURACY, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (eval mode)")
    ax.set_title(f"Two circles, batch 32, Adam: median and range over {len(result.seeds)} seeds")
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def run_demo(
    seeds: int = 5, epochs: int = 100, out: Path | None = None, progress: bool = True
) -> tuple[DemoResult, Path]:
    """Train every variant from ``seeds`` seeds; write ``curves.png`` and ``results.json``.

    Under torchrun (torch.distributed initialized) every rank trains data-parallel (see
    :func:`train_one`) and only rank 0 shows progress and writes the files.
    """
    data = load_circles()
    out = Path(out) if out is not None else Path("bnorm-out") / "demo"
    seed_list = list(range(seeds))
    runs = []
    main_process = bd.is_main_process()
    progress = progress and main_process
    with tqdm(
        total=len(VARIANTS) * seeds * epochs, desc="bnorm demo", unit="epoch", disable=not progress
    ) as bar:
        for variant in VARIANTS:
            for seed in seed_list:
                bar.set_postfix_str(f"{variant}, seed {seed}")
                runs.append(train_one(variant, seed, epochs=epochs, data=data, on_epoch=bar.update))
    result = DemoResult(runs=runs, epochs=epochs, seeds=seed_list)
    if not main_process:
        return result, out
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(result, out / "curves.png")
    payload = {"epochs": epochs, "seeds": seed_list, "runs": [asdict(r) for r in runs]}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    return result, out


def _launch_rank() -> int:
    # after destroy_process_group the rank is only in torchrun's environment
    return int(os.environ.get("RANK", "0"))


def _launch_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_command(args: argparse.Namespace) -> int:
    """``bnorm demo`` after :mod:`bnorm.cli` checked the options (``seeds``, ``epochs`` at least
    1, ``out`` writable): train on one torch thread, print the table, write the files."""
    start = time.perf_counter()
    # Networks of 50 units: a second thread only adds synchronization, and on a busy machine
    # a thread waiting for a core stalls every step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Under `torchrun --nproc-per-node N -m bnorm demo`: data-parallel over gloo, rank 0
        # reports.
        with bd.process_group_from_env() as distributed:
            result, out = run_demo(args.seeds, args.epochs, args.out, progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    if _launch_rank() != 0:  # only rank 0 reports
        return 0
    print()
    if distributed:
        print(
            f"Data-parallel over {_launch_world()} processes (gloo, SyncBatchNorm, DDP); "
            "each step's global batch is split between them."
        )
    print(
        f"The article's example: make_circles, 500 train / 500 test, {args.epochs} epochs, "
        f"{args.seeds} seed(s); median [min–max] over seeds."
    )
    print(result.table())
    print(f"\nlearning curves: {out / 'curves.png'}")
    print(f"all numbers:     {out / 'results.json'}")
    print(f"total time:      {time.perf_counter() - start:.1f} s")
    return 0
