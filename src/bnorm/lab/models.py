"""Small models shared by the lab's experiments, and one helper that trains one of them.

Kept deliberately plain: an experiment's file says which model it uses and why; the builders
only spare each file the same twenty lines.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..modules import BatchNorm1d
from .data import Dataset
from .train import History, Sampler, fit, seed_all

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def mlp(
    sizes: list[int],
    act: str = "relu",
    *,
    bn: bool = False,
    dropout: float = 0.0,
    init_scale: float | None = None,
    momentum: float = 0.1,
) -> nn.Sequential:
    """Linear → [BatchNorm1d] → activation → [Dropout] per hidden layer, then a last Linear.

    ``sizes`` = [inputs, hidden..., outputs]. Batch norm sits between the linear layer and the
    activation, as in the paper (and the article's text). ``init_scale`` multiplies a He-normal
    initialization (std = sqrt(2 / fan_in)); None keeps torch's default initialization.
    With batch norm the linear layers have no bias (BN's β plays that role).
    """
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        linear = nn.Linear(n_in, n_out, bias=last or not bn)
        if init_scale is not None:
            nn.init.normal_(linear.weight, std=init_scale * math.sqrt(2.0 / n_in))
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        layers.append(linear)
        if last:
            break
        if bn:
            layers.append(BatchNorm1d(n_out, momentum=momentum))
        layers.append(ACTIVATIONS[act]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def train(
    model: nn.Module,
    data: Dataset,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    optimizer: str = "sgd",
    eval_every: int,
    sampler: Sampler | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> History:
    """Train ``model`` with plain SGD (``"sgd"``), SGD with momentum 0.9 (``"momentum"``) or
    Adam (``"adam"``) through :func:`bnorm.lab.train.fit`; the data order depends on ``seed``.

    Build the model after calling :func:`bnorm.lab.train.seed_all` (or pass it here built
    under the same seed) so weights and data order are both reproducible.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    params = model.parameters()
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    elif optimizer == "momentum":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd', 'momentum' or 'adam', got {optimizer!r}")
    return fit(
        model,
        data,
        steps=steps,
        batch_size=batch_size,
        optimizer=opt,
        generator=generator,
        eval_every=eval_every,
        sampler=sampler,
        on_step=on_step,
    )


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``seed_all(seed)``: the same seed gives the same initial weights."""
    seed_all(seed)
    return build()


def subset(data: Dataset, n_train: int) -> Dataset:
    """The first ``n_train`` training samples (the test set unchanged)."""
    return Dataset(
        f"{data.name}[:{n_train}]",
        data.x_train[:n_train],
        data.y_train[:n_train],
        data.x_test,
        data.y_test,
        data.num_classes,
    )


def censored(first: Any, limit: int) -> int:
    """A run that never reached a target counts as ``limit + 1`` (ranks after all that did)."""
    return limit + 1 if first is None else int(first)
