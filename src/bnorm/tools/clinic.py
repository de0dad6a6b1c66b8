"""The clinic: small models with one planted batch-norm defect each, and their healthy twins.

Every model is a 64-32-10 MLP, ``features = Linear(64, 32) → BatchNorm1d(32) → ReLU`` and
``head = Linear(32, 10)`` (torch's own layers, as a user's model would have), trained in a
second or so on one thread on scikit-learn's 1,797 real 8×8 digits (``load_digits``, offline;
the ``lab`` extra), 1,400 to train and 397 to test in a fixed random order. SGD with momentum
0.9, lr 0.05, batches of 64, 150 steps unless the defect says otherwise.

Sick examples (planted defect → rule the doctor must report; healthy twin):

- ``few-steps``: BN momentum 0.005, so 150 steps leave 47% of the initial running values →
  ``unconverged``; twin ``healthy``.
- ``unshuffled``: trained (and diagnosed) on a loader sorted by class → ``non-iid``; twin
  ``healthy``.
- ``batch-2``: trained with batches of 2 → ``small-batch``; twin ``healthy``.
- ``frozen-backbone``: ``features`` frozen (``requires_grad=False``) under a new head but left
  in training mode, so its statistics drift → ``frozen-updating``; twin
  ``healthy-frozen-backbone`` (frozen with :func:`bnorm.freeze`).
- ``partial-eval``: ``model.eval()``, then a helper puts the BN back in training mode →
  ``train-mode-in-eval``; twin ``healthy``.
- ``dead-channel``: Linear → ReLU → BN with three ReLUs dead from the start (bias −100); more
  die in training (BN after the ReLU cannot keep them alive, BN before it centres them) →
  ``degenerate``; twin ``healthy``.
- ``redundant-bias``: ``Linear(64, 32, bias=True)`` right before the BN → ``redundant-bias``;
  twin ``healthy``.

:func:`example` gives ``(model, batches, targets)`` as ``bnorm doctor --example`` uses it;
:func:`cure` applies the doctor's prescription for a defect and measures the symptom before
and after. Trained models are cached per process (copies are handed out).
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EXAMPLES", "Example", "cure", "digits", "example"]

STEPS = 150
BATCH = 64
LR = 0.05


@dataclass(frozen=True)
class Example:
    """A clinic case: the rule the doctor must report (None for a healthy twin), its twin."""

    name: str
    defect: str
    rule: str | None
    twin: str | None


EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in (
        Example(
            "few-steps",
            "running statistics from too few steps (momentum 0.005, 150 steps)",
            "unconverged",
            "healthy",
        ),
        Example("unshuffled", "unshuffled loader (batches sorted by class)", "non-iid", "healthy"),
        Example("batch-2", "batch size 2", "small-batch", "healthy"),
        Example(
            "frozen-backbone",
            "frozen backbone still updating its statistics",
            "frozen-updating",
            "healthy-frozen-backbone",
        ),
        Example(
            "partial-eval",
            "partial .eval(): a BN layer left in training mode",
            "train-mode-in-eval",
            "healthy",
        ),
        Example(
            "dead-channel",
            "dead channels: Linear → ReLU → BN, three ReLUs dead from the "
            "start and more dying in training",
            "degenerate",
            "healthy",
        ),
        Example("redundant-bias", "Linear bias right before the BN", "redundant-bias", "healthy"),
        Example("healthy", "none", None, None),
        Example("healthy-frozen-backbone", "none (backbone frozen with bnorm.freeze)", None, None),
    )
}


@dataclass(frozen=True)
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@functools.cache
def digits() -> Digits:
    """scikit-learn's digits, pixels scaled to [0, 1], 1,400 train / 397 test (fixed order)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.tensor(x / 16.0, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))
    xt, yt = xt[order], yt[order]
    return Digits(xt[:1400], yt[:1400], xt[1400:], yt[1400:])


@contextmanager
def _one_thread() -> Iterator[None]:
    # the clinic's models are tiny: one thread is faster and leaves the other cores alone
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def net(
    *,
    bias: bool = False,
    relu_first: bool = False,
    momentum: float = 0.1,
    norm: Callable[..., nn.Module] = nn.BatchNorm1d,
) -> nn.Sequential:
    """The clinic's MLP: ``features`` (Linear → BN → ReLU, or Linear → ReLU → BN) and ``head``."""
    bn = norm(32, momentum=momentum)
    linear = nn.Linear(64, 32, bias=bias or relu_first)
    body = [linear, nn.ReLU(), bn] if relu_first else [linear, bn, nn.ReLU()]
    return nn.Sequential(OrderedDict(features=nn.Sequential(*body), head=nn.Linear(32, 10)))


def batches(
    x: Tensor, y: Tensor, batch_size: int, order: str, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """One epoch of ``(x, y)`` batches: ``"shuffled"`` (a seeded permutation) or ``"sorted"``
    by class (what a loader without ``shuffle=True`` gives on class-ordered data). A last
    batch of one sample is dropped (batch norm cannot train on it)."""
    if order == "shuffled":
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    else:
        idx = torch.argsort(y, stable=True)
    return [(x[i], y[i]) for i in idx.split(batch_size) if len(i) > 1]


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int = STEPS,
    batch_size: int = BATCH,
    order: str = "shuffled",
    lr: float = LR,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` (its parameters with ``requires_grad``) in training mode; returns it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    done, epoch = 0, 0
    with _one_thread():
        while done < steps:
            for xb, yb in batches(x, y, batch_size, order, seed=seed * 1000 + epoch):
                if done >= steps:
                    break
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                done += 1
            epoch += 1
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int | None = None) -> float:
    """Accuracy of ``model`` as it is (its modes untouched), in batches of ``batch_size``."""
    n = batch_size or len(x)
    with _one_thread():
        right = sum(
            int((model(x[i : i + n]).argmax(1) == y[i : i + n]).sum()) for i in range(0, len(x), n)
        )
    return right / len(x)


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build()


FINE_TUNE_STEPS = 40


def _fine_tune(base: nn.Module, freeze_bn: bool) -> nn.Module:
    """A new 5-class head on the frozen ``features`` of ``base``, fine-tuned on digits 0-4."""
    from .freeze import freeze

    d = digits()
    model = copy.deepcopy(base)
    model.features.requires_grad_(False)
    if freeze_bn:
        model.features = freeze(model.features)
    torch.manual_seed(1)
    model.head = nn.Linear(32, 5)
    keep = d.y_train < 5
    fit(model, d.x_train[keep], d.y_train[keep], steps=FINE_TUNE_STEPS, seed=1)
    return model.train()


@functools.cache
def _trained(name: str) -> nn.Module:
    d = digits()
    if name == "healthy":
        return fit(_seeded(net), d.x_train, d.y_train).eval()
    if name == "few-steps":
        return fit(_seeded(lambda: net(momentum=0.005)), d.x_train, d.y_train).eval()
    if name == "unshuffled":
        return fit(_seeded(net), d.x_train, d.y_train, order="sorted").eval()
    if name == "batch-2":
        return fit(_seeded(net), d.x_train, d.y_train, batch_size=2, steps=700, lr=0.01).eval()
    if name == "batch-2-renorm":
        from ..modules.renorm import BatchRenorm1d

        def build() -> nn.Module:
            return net(norm=lambda c, momentum: BatchRenorm1d(c, momentum=momentum))

        return fit(_seeded(build), d.x_train, d.y_train, batch_size=2, steps=700, lr=0.01).eval()
    if name == "frozen-backbone":
        return _fine_tune(_trained("healthy"), freeze_bn=False)
    if name == "healthy-frozen-backbone":
        return _fine_tune(_trained("healthy"), freeze_bn=True)
    if name == "partial-eval":
        model = copy.deepcopy(_trained("healthy")).eval()
        model.features[1].train()  # e.g. a helper meant to re-enable dropout for MC sampling
        return model
    if name == "dead-channel":
        model = _seeded(lambda: net(relu_first=True))
        with torch.no_grad():
            model.features[0].bias[:3] = -100.0  # these ReLUs never fire: no gradient either
        return fit(model, d.x_train, d.y_train).eval()
    if name == "redundant-bias":
        return fit(_seeded(lambda: net(bias=True)), d.x_train, d.y_train).eval()
    raise KeyError(name)


def example(name: str) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], None]:
    """``(model, batches, None)`` of a clinic example: a copy of the trained model and the
    batches its user would hand the doctor (the training loader's epoch; targets inside)."""
    if name not in EXAMPLES:
        raise KeyError(f"no clinic example {name!r}; choose from {', '.join(EXAMPLES)}")
    d = digits()
    model = copy.deepcopy(_trained(name))
    if name in ("frozen-backbone", "healthy-frozen-backbone"):
        keep = d.y_train < 5
        data = batches(d.x_train[keep], d.y_train[keep], BATCH, "shuffled", seed=7)
    elif name == "unshuffled":
        data = batches(d.x_train, d.y_train, BATCH, "sorted")
    elif name == "batch-2":
        data = batches(d.x_train, d.y_train, 2, "shuffled", seed=7)
    else:
        data = batches(d.x_train, d.y_train, BATCH, "shuffled", seed=7)
    return model, data, None


def _drift(before: nn.Module, after: nn.Module) -> float:
    """Largest standardized change of the backbone's running mean (in running stds)."""
    a, b = before.features[1], after.features[1]
    return float(((b.running_mean - a.running_mean).abs() / (a.running_var + a.eps).sqrt()).max())


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pruned(model: nn.Module, dead: list[int]) -> nn.Module:
    """The Linear → ReLU → BN → head model without the ``dead`` channels: their constant
    output, ``β − γ·μ̂/√(σ̂² + ε)`` in evaluation, moves into the head's bias."""
    lin, bn, head = model.features[0], model.features[2], model.head
    keep = [c for c in range(bn.num_features) if c not in dead]
    slim = copy.deepcopy(model).eval()
    new_lin, new_bn, new_head = (
        nn.Linear(64, len(keep)),
        nn.BatchNorm1d(len(keep)),
        nn.Linear(len(keep), head.out_features),
    )
    with torch.no_grad():
        new_lin.weight.copy_(lin.weight[keep])
        new_lin.bias.copy_(lin.bias[keep])
        for t in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, t).copy_(getattr(bn, t)[keep])
        new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        const = (
            bn.bias[dead]
            - bn.weight[dead] * bn.running_mean[dead] / (bn.running_var[dead] + bn.eps).sqrt()
        )
        new_head.weight.copy_(head.weight[:, keep])
        new_head.bias.copy_(head.bias + head.weight[:, dead] @ const)
    slim.features[0], slim.features[2], slim.head = new_lin, new_bn, new_head
    return slim.eval()


def cure(name: str) -> dict[str, Any]:
    """Apply the doctor's prescription for the sick example ``name``; measure the symptom
    before and after. Returns ``{"prescription", "measure", "before", "after"}``."""
    from .precise import precise_bn

    d = digits()
    model, data, _ = example(name)
    shuffled = batches(d.x_train, d.y_train, BATCH, "shuffled", seed=3)
    if name == "few-steps":
        treated = precise_bn(copy.deepcopy(model), shuffled)
        return {
            "prescription": "bnorm.precise_bn(model, batches)",
            "measure": "eval-mode test accuracy",
            "before": accuracy(model, d.x_test, d.y_test),
            "after": accuracy(treated, d.x_test, d.y_test),
        }
    if name == "unshuffled":
        from .doctor import between_batch_ratio, doctor

        retrained = _trained("healthy")

        def ratio(m: nn.Module, b: list[Any]) -> float:
            r = doctor(m, b).layers[0]
            return float(between_batch_ratio(r.batch_means, r.batch_sizes, r.sample_var).median())

        return {
            "prescription": "DataLoader(..., shuffle=True) and retrain",
            "measure": "between-batch variance ratio; eval-mode test accuracy",
            "before": [ratio(model, data), accuracy(model, d.x_test, d.y_test)],
            "after": [ratio(retrained, shuffled), accuracy(retrained, d.x_test, d.y_test)],
        }
    if name == "batch-2":
        renorm = _trained("batch-2-renorm")
        return {
            "prescription": "bnorm.BatchRenorm1d(32) in place of BatchNorm1d(32), batch 2",
            "measure": "eval-mode test accuracy after the same 700 steps at batch 2",
            "before": accuracy(model, d.x_test, d.y_test),
            "after": accuracy(renorm, d.x_test, d.y_test),
        }
    if name == "frozen-backbone":
        base = _trained("healthy")
        frozen = _trained("healthy-frozen-backbone")

        def old_task(m: nn.Module) -> float:
            probe = copy.deepcopy(base)
            probe.features = copy.deepcopy(m.features)
            return accuracy(probe.eval(), d.x_test, d.y_test)

        return {
            "prescription": "model.features = bnorm.freeze(model.features)",
            "measure": "backbone running-mean drift over the fine-tuning (stds); "
            "original 10-class test accuracy through the fine-tuned backbone",
            "before": [_drift(base, model), old_task(model)],
            "after": [
                float(
                    ((frozen.features[1].running_mean - base.features[1].running_mean).abs()).max()
                ),
                old_task(frozen),
            ],
        }
    if name == "partial-eval":
        # deployed inference on small batches that arrive grouped (one user's uploads, ...)
        order = torch.argsort(d.y_test, stable=True)
        x, y = d.x_test[order], d.y_test[order]
        return {
            "prescription": "model.eval()",
            "measure": "test accuracy in class-grouped batches of 8",
            "before": accuracy(model, x, y, batch_size=8),
            "after": accuracy(copy.deepcopy(model).eval(), x, y, batch_size=8),
        }
    if name == "dead-channel":
        from .doctor import doctor

        dead = doctor(model, data).findings[0].numbers["dead_channels"]
        slim = _pruned(model, dead)
        with torch.no_grad():
            change = float((model(d.x_test) - slim(d.x_test)).abs().max())
        return {
            "prescription": f"prune channels {dead} of model.features[2]",
            "measure": "dead channels; parameters; max |eval output change|",
            "before": [len(dead), _count(model), 0.0],
            "after": [len(doctor(slim, data).findings), _count(slim), change],
        }
    if name == "redundant-bias":
        slim = copy.deepcopy(model)
        lin, bn = slim.features[0], slim.features[1]
        with torch.no_grad():
            # the bias moves every input of the BN, so its running mean holds it: subtract it
            bn.running_mean -= lin.bias
        lin.bias = None
        with torch.no_grad():
            change = float((model(d.x_test) - slim(d.x_test)).abs().max())
        count = _count(model)
        return {
            "prescription": "nn.Linear(64, 32, bias=False)",
            "measure": "parameters; max |eval output change|",
            "before": [count, 0.0],
            "after": [_count(slim), change],
        }
    raise KeyError(f"{name!r} is not a sick clinic example")
