"""The lab's one training loop: mini-batch training with periodic evaluation.

Every experiment trains through :func:`fit`, so they all measure the same way: the model is
trained in train mode on mini-batches drawn by a seeded permutation per epoch (or by a custom
``batches`` sampler, e.g. the non-i.i.d. batches of the train-vs-inference experiment), and
evaluated in **eval mode** (running statistics, as at inference) every ``eval_every`` steps on
the test set and on a fixed subset of the training set. A non-finite loss stops the run and
marks it diverged.

Under ``torchrun --nproc-per-node N`` (see :mod:`bnorm.distributed`) the same loop trains
data-parallel: every rank draws the same global batch, keeps its shard, the model's batch-norm
layers become :class:`bnorm.SyncBatchNorm` inside DistributedDataParallel, and the loss is
scaled so the gradient is that of the mean over the *global* batch. The global batch size,
and so the batch statistics, stay what they are in one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as bd
from .data import Dataset

Sampler = Callable[[int, torch.Generator], Iterator[torch.Tensor]]
"""``sampler(n, generator)`` yields index tensors of one epoch."""


def seed_all(seed: int) -> torch.Generator:
    """Seed torch's global generator (weight init, dropout) and return a data-order generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(10_000 + seed)


def shuffled_batches(batch_size: int) -> Sampler:
    """The usual sampler: a fresh random permutation per epoch, cut into ``batch_size`` chunks.

    A last chunk of one sample is dropped: batch norm cannot train on one value per channel.
    """

    def sample(n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            if len(idx) > 1:
                yield idx

    return sample


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Eval-mode accuracy of a classifier (logits of shape (N, classes)); the mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)


@dataclass
class History:
    """What :func:`fit` saw: evaluations at ``steps`` and how long it took."""

    steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    diverged: bool = False
    seconds: float = 0.0

    def first_step_at(self, target: float) -> int | None:
        """The first evaluated step whose test accuracy reaches ``target``, or None."""
        pairs = zip(self.steps, self.test_acc, strict=True)
        return next((s for s, a in pairs if a >= target), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "test_acc": self.test_acc,
            "train_acc": self.train_acc,
            "loss": self.loss,
            "diverged": self.diverged,
            "seconds": self.seconds,
            "final_test_acc": self.test_acc[-1] if self.test_acc else None,
            "best_test_acc": max(self.test_acc) if self.test_acc else None,
            "final_train_acc": self.train_acc[-1] if self.train_acc else None,
        }


def fit(
    model: nn.Module,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    eval_every: int,
    sampler: Sampler | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    train_eval_size: int = 1000,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> History:
    """Train ``model`` for ``steps`` optimizer steps and evaluate every ``eval_every`` steps.

    Args:
        model: a classifier returning logits (N, classes).
        data: the dataset (train tensors are sampled, test tensors evaluated).
        steps: number of optimizer steps (epochs are as many as needed).
        batch_size: samples per step (ignored when ``sampler`` is given).
        optimizer: over ``model``'s parameters.
        generator: the data-order generator (see :func:`seed_all`).
        eval_every: evaluate after every this many steps (and after the last one).
        sampler: yields the index tensors of one epoch; defaults to :func:`shuffled_batches`.
        loss_fn: defaults to cross-entropy.
        train_eval_size: how many training samples the train accuracy is measured on.
        on_step: called after each step with (step, loss) — e.g. to record activations.

    Returns:
        The :class:`History`. A non-finite loss stops training and sets ``diverged``; the
        remaining evaluations are not made (chance-level accuracy is recorded once).

    Data-parallel (under torchrun): ``model`` is wrapped by :func:`bnorm.distributed.prepare_model`
    for the duration of the call (its BatchNorm1d/2d/3d layers are swapped for SyncBatchNorm
    ones sharing the same tensors, so ``optimizer`` keeps working, and put back afterwards);
    ``loss_fn`` must return the mean over its batch; the recorded loss is the global-batch mean;
    evaluation runs on every rank without collectives. Other normalization layers keep per-rank
    statistics.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    sampler = sampler or shuffled_batches(batch_size)
    history = History()
    x_train, y_train = data.x_train, data.y_train
    x_tr_eval, y_tr_eval = x_train[:train_eval_size], y_train[:train_eval_size]
    step = 0
    running = 0.0
    seen = 0
    start = time.perf_counter()
    parallel = bd.world_size() > 1
    slots = _batch_norm_slots(model) if parallel else []
    net = bd.prepare_model(model) if parallel else model
    model.train()
    while step < steps and not history.diverged:
        for idx in sampler(len(x_train), generator):
            optimizer.zero_grad(set_to_none=True)
            if parallel:
                mine = bd.shard(idx)
                # local mean × local size = local sum; DDP averages over ranks; the scale
                # turns that into the mean over the global batch even for uneven shards.
                scale = len(mine) * bd.global_mean_loss_scale(len(mine), len(idx))
                loss = loss_fn(net(x_train[mine]), y_train[mine]) * scale
                # Every rank must agree on divergence and report the same loss: the global mean.
                total = loss.detach().clone()
                dist.all_reduce(total)
                value = float(total) / bd.world_size()
            else:
                loss = loss_fn(net(x_train[idx]), y_train[idx])
                value = float(loss.detach())
            if not math.isfinite(value):
                history.diverged = True
                history.steps.append(step + 1)
                history.test_acc.append(1.0 / data.num_classes)
                history.train_acc.append(1.0 / data.num_classes)
                history.loss.append(None)
                break
            loss.backward()
            optimizer.step()
            step += 1
            running += value
            seen += 1
            if on_step is not None:
                on_step(step, loss)
            if step % eval_every == 0 or step == steps:
                history.steps.append(step)
                history.test_acc.append(accuracy(model, data.x_test, data.y_test))
                history.train_acc.append(accuracy(model, x_tr_eval, y_tr_eval))
                history.loss.append(running / seen)
                running, seen = 0.0, 0
            if step >= steps:
                break
    history.seconds = time.perf_counter() - start
    for parent, name, layer in slots:
        parent._modules[name] = layer
    return history


def _batch_norm_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every batch-norm layer, to put back after a data-parallel fit.

    ``prepare_model`` swaps them for SyncBatchNorm layers that share their parameters and
    buffers (updated in place); the experiment keeps using ``model`` in one process after the
    fit, so the original layers go back in their slots.
    """
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent._modules.items()
        if isinstance(child, nn.modules.batchnorm._BatchNorm)
    ]
