r"""Precise batch-norm statistics: the exact population statistics of each layer's inputs.

The running statistics of batch norm are an exponential moving average of per-batch estimates
taken while the weights were still changing; they lag behind the final network, and that lag is
part of the train/inference gap (Wu & Johnson 2021, "Rethinking batch in BatchNorm"). After
training, :func:`precise_bn` replaces them by the statistics of every layer's input over a set of
batches, merged exactly as if the batches were one:

.. math::

    n = \sum_k n_k, \qquad \mu = \frac{1}{n}\sum_k n_k \mu_k, \qquad
    M_2 = \sum_k \left(M_{2,k} + n_k (\mu_k - \mu)^2\right), \qquad
    \text{running\_var} = \frac{M_2}{n - 1},

(Chan, Golub & LeVeque's parallel merge, accumulated pairwise in float64), which is *not* the
average of the per-batch variances: that average misses the spread of the batch means and
weights unequal batches equally.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..modules.recurrent import RecurrentBatchNorm1d

__all__ = ["MergedStats", "precise_bn"]


@dataclass
class MergedStats:
    """Count, mean and sum of squared deviations (M2) per channel, merged exactly (float64)."""

    count: int = 0
    mean: Tensor | None = None
    m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Merge the per-channel statistics of ``x`` (N, C, \\*), channels on dim 1."""
        x = x.detach().to(torch.float64)
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1] if x.shape[1] else 0
        if n == 0:
            return
        mean = x.mean(dims)
        # two passes over the batch: its own M2 is exact before it is merged
        m2 = ((x - mean.view((1, -1) + (1,) * (x.dim() - 2))) ** 2).sum(dims)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        assert self.mean is not None and self.m2 is not None
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    @property
    def unbiased_var(self) -> Tensor:
        assert self.m2 is not None
        return self.m2 / (self.count - 1)


def _is_batch_norm(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.running_mean is not None
        and m.running_var is not None
    )


def _step_of(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The key of the statistics an input belongs to: 0, or the time step of a recurrent BN."""
    if not _is_recurrent_bn(m):
        return 0
    return m.step_index(args[1] if len(args) > 1 else kwargs["t"])


def precise_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
) -> nn.Module:
    r"""Set every batch-norm layer's running mean and (unbiased) running variance to the exact
    statistics of that layer's inputs over ``batches``, as if they were one batch.

    Layers: every ``torch.nn`` batch norm with running statistics (``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``) and bnorm's layers built on them (``BatchNorm*``, ``BatchRenorm*``,
    ``GhostBatchNorm*``, ``BatchNormAct*``), and :class:`bnorm.RecurrentBatchNorm1d` (also
    inside :class:`bnorm.BNLSTM`), whose statistics are merged and set per time step (steps
    the batches never reach keep theirs). Frozen layers and layers without running statistics are
    left alone.

    How: the model runs in training mode under ``torch.no_grad()``, batch by batch, so each
    layer normalizes with its batch's statistics exactly as during training, and a forward
    pre-hook merges each layer's input into float64 count/mean/M2 accumulators (see the module
    docstring). Momentum plays no role: it is set to 0 during the pass (so Batch Renorm sees
    fixed running statistics) and restored. Other train-mode behaviour, such as dropout, is
    active as in training.

    Afterwards the model's train/eval mode (module by module), every momentum, every parameter
    and every buffer other than the new ``running_mean``/``running_var`` are as they were;
    ``num_batches_tracked`` is unchanged too (precise_bn does not train, and a cumulative
    average, ``momentum=None``, goes on with its old count). A layer that received fewer than
    two values per channel keeps its statistics, with a warning.

    Args:
        model: the model, changed in place and returned.
        batches: an iterable of inputs: tensors, or tuples/lists whose first element is the
            input (e.g. a DataLoader yielding ``(x, y)``). Each is passed as ``model(x)`` in
            training mode, so each must be a valid training batch (more than one value per
            channel at every layer). If a batch raises, the model is restored and the error
            propagates.
        num_batches: use at most this many batches (default: all).

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"precise_bn: expected a torch.nn.Module, got {type(model).__name__}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(
            f"precise_bn: num_batches must be a positive int or None, got {num_batches!r}"
        )
    layers = [m for m in model.modules() if _is_batch_norm(m) or _is_recurrent_bn(m)]
    if not layers:
        raise ValueError("precise_bn: the model has no batch-norm layer with running statistics")

    stats: dict[nn.Module, dict[int, MergedStats]] = {m: {} for m in layers}

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        stats[m].setdefault(_step_of(m, args, kwargs), MergedStats()).add(x)

    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    saved = {id(b): (b, b.detach().clone()) for b in model.buffers()}
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    used = 0
    try:
        for m in layers:
            m.momentum = 0.0
        model.train()
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and used >= num_batches:
                    break
                x = batch[0] if isinstance(batch, tuple | list) else batch
                model(x)
                used += 1
    finally:
        for h in handles:
            h.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for buffer, value in saved.values():
                buffer.copy_(value)
    if used == 0:
        raise ValueError("precise_bn: `batches` yielded no batch")
    starved = []
    with torch.no_grad():
        for m, per_step in stats.items():
            for step, merged in sorted(per_step.items()):
                if merged.count < 2:
                    starved.append(f"{type(m).__name__}({m.num_features})")
                    continue
                assert merged.mean is not None
                if _is_recurrent_bn(m):
                    m.running_mean[step].copy_(merged.mean)
                    m.running_var[step].copy_(merged.unbiased_var)
                else:
                    m.running_mean.copy_(merged.mean)
                    m.running_var.copy_(merged.unbiased_var)
            if not per_step:  # never called
                starved.append(f"{type(m).__name__}({m.num_features})")
    if starved:
        warnings.warn(
            "precise_bn: these layers received fewer than 2 values per channel (or no input) "
            f"and keep their running statistics: {', '.join(starved)}",
            UserWarning,
            stacklevel=2,
        )
    return model


def _is_recurrent_bn(m: nn.Module) -> bool:
    return isinstance(m, RecurrentBatchNorm1d)
