r"""Batch normalization stated in NumPy float64: the spec every fast path is tested against.

This module is meant to be read. Each derivative sits next to the forward computation it
differentiates, and nothing here is optimised.

Conventions
-----------
``x`` has any rank >= 2. Its channels lie on ``axis`` (1 by default, as ``(N, C, *)`` in
PyTorch; pass ``axis=-1`` for channels-last data such as ``(N, H, W, C)``). Statistics are taken
per channel over every other axis; ``m`` is the number of values per channel.

.. math::

    \mu = \frac{1}{m}\sum x, \qquad
    \sigma^2 = \frac{1}{m}\sum (x-\mu)^2 \quad\text{(biased: used to normalize)},

    \hat x = \frac{x-\mu}{\sqrt{\sigma^2+\epsilon}}, \qquad y = \gamma\,\hat x + \beta .

Running statistics follow PyTorch (not Keras): ``momentum`` is the *update rate*,

.. math::

    \hat\mu \leftarrow (1-\text{momentum})\,\hat\mu + \text{momentum}\,\mu, \qquad
    \hat\sigma^2 \leftarrow (1-\text{momentum})\,\hat\sigma^2
        + \text{momentum}\,\sigma^2\,\frac{m}{m-1} \quad\text{(unbiased)},

and ``momentum=None`` means the cumulative average: the t-th tracked batch uses ``1/t``.
Keras' ``momentum=0.99`` is a decay; it corresponds to PyTorch's ``momentum=0.01``
(see :func:`keras_momentum`).

Evaluation uses the running statistics in place of the batch statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BatchStats",
    "Cache",
    "backward",
    "backward_eval",
    "batch_stats",
    "forward_eval",
    "forward_train",
    "keras_momentum",
    "merge_stats",
    "update_running_stats",
]


@dataclass(frozen=True)
class BatchStats:
    """Per-channel statistics of one batch: ``mean``, biased ``var`` (shape (C,)), ``count`` = m."""

    mean: np.ndarray
    var: np.ndarray
    count: int


@dataclass(frozen=True)
class Cache:
    """What :func:`backward` needs from :func:`forward_train`."""

    xhat: np.ndarray  # normalized input, same shape as x
    invstd: np.ndarray  # 1/sqrt(var + eps), shape (C,)
    gamma: np.ndarray  # shape (C,)
    axis: int  # channel axis, non-negative
    stats: BatchStats


def _axis(x: np.ndarray, axis: int) -> int:
    if x.ndim < 2:
        raise ValueError(f"batch norm needs an input of rank >= 2, got shape {x.shape}")
    return axis % x.ndim


def _reduce_axes(x: np.ndarray, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(x.ndim) if a != axis)


def _per_channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshape a (C,) vector so it broadcasts along ``axis`` of an ``ndim``-rank array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def _gamma_beta(c: int, gamma, beta) -> tuple[np.ndarray, np.ndarray]:
    g = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    b = np.zeros(c) if beta is None else np.asarray(beta, dtype=np.float64)
    return g, b


def batch_stats(x: np.ndarray, axis: int = 1) -> BatchStats:
    """Mean and biased variance per channel, in float64 and in two passes (exact, not fast).

    An empty batch has no statistics: NaN, with ``count == 0``.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = _axis(x, axis)
    red = _reduce_axes(x, axis)
    count = x.size // x.shape[axis] if x.shape[axis] else 0
    if count == 0:  # an empty batch has no statistics
        nan = np.full(x.shape[axis], np.nan)
        return BatchStats(mean=nan, var=nan.copy(), count=0)
    mean = x.mean(axis=red)
    var = ((x - _per_channel(mean, x.ndim, axis)) ** 2).mean(axis=red)
    return BatchStats(mean=mean, var=var, count=count)


def merge_stats(parts: Sequence[BatchStats]) -> BatchStats:
    r"""Statistics of the union of several batches, from theirs alone (Chan, Golub, LeVeque 1979).

    With counts :math:`n_k`, means :math:`\mu_k` and sums of squared deviations
    :math:`M_k = n_k\sigma_k^2`: :math:`n=\sum n_k`, :math:`\mu=\sum n_k\mu_k/n` and
    :math:`M=\sum M_k + \sum n_k(\mu_k-\mu)^2`. Exact, unlike averaging per-batch variances.
    """
    parts = [p for p in parts if p.count > 0]
    if not parts:
        raise ValueError("merge_stats needs at least one non-empty batch")
    n = sum(p.count for p in parts)
    mean = sum(p.count * p.mean for p in parts) / n
    m2 = sum(p.count * p.var + p.count * (p.mean - mean) ** 2 for p in parts)
    return BatchStats(mean=mean, var=m2 / n, count=n)


def forward_train(
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, Cache]:
    """Training-mode forward: normalize with the batch's own statistics.

    Returns ``(y, cache)``; ``cache.stats`` holds the batch mean, biased variance and count
    for :func:`update_running_stats`, the rest is for :func:`backward`.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = _axis(x, axis)
    stats = batch_stats(x, axis)
    g, b = _gamma_beta(x.shape[axis], gamma, beta)
    invstd = 1.0 / np.sqrt(stats.var + eps)
    xhat = (x - _per_channel(stats.mean, x.ndim, axis)) * _per_channel(invstd, x.ndim, axis)
    y = _per_channel(g, x.ndim, axis) * xhat + _per_channel(b, x.ndim, axis)
    return y, Cache(xhat=xhat, invstd=invstd, gamma=g, axis=axis, stats=stats)


def backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of a training-mode forward: ``(dx, dgamma, dbeta)``.

    Derivation, per channel, with :math:`s = (\sigma^2+\epsilon)^{-1/2}` and
    :math:`g = \partial L/\partial\hat x = \gamma\,dy`:

    - :math:`\partial\mu/\partial x_j = 1/m` and
      :math:`\partial\sigma^2/\partial x_j = 2(x_j-\mu)/m`,
      so :math:`\partial s/\partial x_j = -s^3 (x_j-\mu)/m`;
    - :math:`\partial\hat x_i/\partial x_j = s\,(\delta_{ij} - 1/m - \hat x_i\hat x_j/m)`;
    - :math:`dx_j = \sum_i g_i\,\partial\hat x_i/\partial x_j
      = s\,(g_j - \overline{g} - \hat x_j\,\overline{g\hat x})`, bars being channel means.
    """
    dy = np.asarray(dy, dtype=np.float64)
    axis, nd = cache.axis, dy.ndim
    red = _reduce_axes(dy, axis)
    dbeta = dy.sum(axis=red)  # y = γx̂ + β  ⇒  ∂L/∂β = Σ dy
    dgamma = (dy * cache.xhat).sum(axis=red)  # ∂L/∂γ = Σ dy·x̂
    if cache.stats.count == 0:
        return np.zeros_like(dy), dgamma, dbeta
    g = dy * _per_channel(cache.gamma, nd, axis)  # ∂L/∂x̂
    g_mean = g.mean(axis=red)
    gx_mean = (g * cache.xhat).mean(axis=red)
    dx = _per_channel(cache.invstd, nd, axis) * (
        g - _per_channel(g_mean, nd, axis) - cache.xhat * _per_channel(gx_mean, nd, axis)
    )
    return dx, dgamma, dbeta


def forward_eval(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> np.ndarray:
    """Evaluation-mode forward: an affine map per channel, with the running statistics fixed."""
    x = np.asarray(x, dtype=np.float64)
    axis = _axis(x, axis)
    g, b = _gamma_beta(x.shape[axis], gamma, beta)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    xhat = (x - _per_channel(running_mean, x.ndim, axis)) * _per_channel(invstd, x.ndim, axis)
    return _per_channel(g, x.ndim, axis) * xhat + _per_channel(b, x.ndim, axis)


def backward_eval(
    dy: np.ndarray,
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`forward_eval`: the statistics are constants, so dx = γ·s·dy."""
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    axis = _axis(x, axis)
    red = _reduce_axes(x, axis)
    g, _ = _gamma_beta(x.shape[axis], gamma, None)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    xhat = (x - _per_channel(running_mean, x.ndim, axis)) * _per_channel(invstd, x.ndim, axis)
    dx = dy * _per_channel(g * invstd, x.ndim, axis)
    return dx, (dy * xhat).sum(axis=red), dy.sum(axis=red)


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    stats: BatchStats,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return ``(running_mean, running_var, num_batches_tracked)`` after one training batch.

    The stored variance is unbiased (``var * m / (m - 1)``), as in PyTorch. An empty batch
    (m = 0) has nothing to average: the statistics stay, and the counter still advances, which
    is what PyTorch's layers do.
    """
    t = num_batches_tracked + 1
    if stats.count == 0:
        return np.asarray(running_mean, float), np.asarray(running_var, float), t
    if stats.count == 1:
        raise ValueError("one value per channel: its unbiased variance is undefined")
    rate = 1.0 / t if momentum is None else momentum
    unbiased = stats.var * stats.count / (stats.count - 1)
    new_mean = (1 - rate) * np.asarray(running_mean, float) + rate * stats.mean
    new_var = (1 - rate) * np.asarray(running_var, float) + rate * unbiased
    return new_mean, new_var, t


def keras_momentum(decay: float) -> float:
    """Convert a Keras/TensorFlow BatchNormalization ``momentum`` (a decay, e.g. 0.99) to PyTorch's.

    Keras keeps ``decay * moving + (1 - decay) * batch``; PyTorch keeps
    ``(1 - momentum) * running + momentum * batch``; so ``momentum = 1 - decay``.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"a Keras momentum (decay) lies in [0, 1], got {decay}")
    return 1.0 - decay
