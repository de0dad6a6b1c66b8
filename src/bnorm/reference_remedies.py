r"""The remedies for batch normalization's limitations, stated in NumPy float64.

Like :mod:`bnorm.reference`, this module is meant to be read and is the oracle of the tests; it
reuses that module's conventions (channels on ``axis``, biased variance to normalize, unbiased
running variance, PyTorch's ``momentum``).

- :func:`renorm_forward_train` / :func:`renorm_backward`: Batch Renormalization (Ioffe 2017).
- :func:`ghost_forward_train` / :func:`ghost_running_update`: Ghost Batch Norm (Hoffer 2017).
- :func:`bn_act_forward` / :func:`act_inverse` / :func:`bn_act_backward`: batch norm followed by an
  activation, and the inversion the memory-efficient variant relies on (Rota Bulò et al. 2018).
- :func:`bnlstm_forward`: the batch-normalized LSTM (Cooijmans et al. 2016), with masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reference import (
    BatchStats,
    Cache,
    _gamma_beta,
    _per_channel,
    backward,
    batch_stats,
    forward_train,
    update_running_stats,
)

__all__ = [
    "RenormCache",
    "act_forward",
    "act_inverse",
    "bn_act_backward",
    "bn_act_forward",
    "bnlstm_forward",
    "ghost_forward_train",
    "ghost_running_update",
    "renorm_backward",
    "renorm_forward_train",
]


# --------------------------------------------------------------------------- Batch Renorm


@dataclass(frozen=True)
class RenormCache:
    """What :func:`renorm_backward` needs: the plain batch-norm cache and the constants r, d."""

    bn: Cache
    r: np.ndarray  # shape (C,)
    d: np.ndarray  # shape (C,)


def renorm_forward_train(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    r_max: float = 3.0,
    d_max: float = 5.0,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, RenormCache]:
    r"""Batch Renormalization in training (Ioffe 2017, Algorithm 1).

    .. math::

        \sigma_B = \sqrt{\sigma^2_B + \epsilon}, \quad \sigma = \sqrt{\hat\sigma^2 + \epsilon},
        \quad r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B/\sigma), \quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \hat\mu)/\sigma),

        y = \gamma\,(\hat x\,r + d) + \beta, \qquad \hat x = (x - \mu_B)/\sigma_B,

    with :math:`\hat\mu, \hat\sigma^2` the running statistics *before* this batch's update.
    r and d are constants for the backward. ``r_max=1, d_max=0`` gives r = 1, d = 0: batch norm.
    """
    y_bn, cache = forward_train(x, None, None, eps, axis)  # x̂ with γ = 1, β = 0
    g, b = _gamma_beta(y_bn.shape[cache.axis], gamma, beta)
    sigma_b = np.sqrt(cache.stats.var + eps)
    sigma = np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip(
        (cache.stats.mean - np.asarray(running_mean, dtype=np.float64)) / sigma, -d_max, d_max
    )
    nd, ax = y_bn.ndim, cache.axis
    y = _per_channel(g, nd, ax) * (
        cache.xhat * _per_channel(r, nd, ax) + _per_channel(d, nd, ax)
    ) + _per_channel(b, nd, ax)
    bn_cache = Cache(xhat=cache.xhat, invstd=cache.invstd, gamma=g, axis=ax, stats=cache.stats)
    return y, RenormCache(bn=bn_cache, r=r, d=d)


def renorm_backward(
    dy: np.ndarray, cache: RenormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of :func:`renorm_forward_train`: ``(dx, dgamma, dbeta)``, r and d constant.

    With r, d fixed, :math:`y = (\gamma r)\hat x + (\gamma d + \beta)` is batch norm with scale
    :math:`\gamma r`, so dx is :func:`bnorm.reference.backward` with that scale;
    :math:`\partial L/\partial\gamma = \sum dy\,(\hat x r + d)` and
    :math:`\partial L/\partial\beta = \sum dy`.
    """
    bn = cache.bn
    scaled = Cache(
        xhat=bn.xhat, invstd=bn.invstd, gamma=bn.gamma * cache.r, axis=bn.axis, stats=bn.stats
    )
    dx, sum_dy_xhat, dbeta = backward(dy, scaled)
    dgamma = cache.r * sum_dy_xhat + cache.d * dbeta
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- Ghost BN


def _chunks(n: int, virtual_batch_size: int) -> list[slice]:
    return [slice(i, min(i + virtual_batch_size, n)) for i in range(0, n, virtual_batch_size)]


def ghost_forward_train(
    x: np.ndarray,
    virtual_batch_size: int,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, list[BatchStats]]:
    """Ghost batch norm in training: each consecutive chunk of ``virtual_batch_size`` samples
    along axis 0 (the last may be smaller) is batch-normalized with its own statistics.

    Channels are on axis 1. Returns ``(y, per-chunk statistics)``.
    """
    x = np.asarray(x, dtype=np.float64)
    ys, stats = [], []
    for s in _chunks(x.shape[0], virtual_batch_size):
        y, cache = forward_train(x[s], gamma, beta, eps, axis=1)
        ys.append(y)
        stats.append(cache.stats)
    return np.concatenate(ys, axis=0), stats


def ghost_running_update(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    chunk_stats: list[BatchStats],
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One update per forward, towards the mean of the chunks' means and the mean of the
    chunks' unbiased variances (``var * m / (m - 1)`` per chunk)."""
    mean = np.mean([s.mean for s in chunk_stats], axis=0)
    unbiased = np.mean([s.var * s.count / (s.count - 1) for s in chunk_stats], axis=0)
    t = num_batches_tracked + 1
    rate = 1.0 / t if momentum is None else momentum
    return (
        (1 - rate) * np.asarray(running_mean, float) + rate * mean,
        (1 - rate) * np.asarray(running_var, float) + rate * unbiased,
        t,
    )


# --------------------------------------------------------------------------- BN + activation


def act_forward(z: np.ndarray, act: str, negative_slope: float = 0.01, alpha: float = 1.0):
    """``relu``, ``leaky_relu`` (slope ``negative_slope``), ``elu`` (``alpha``) or ``identity``."""
    z = np.asarray(z, dtype=np.float64)
    if act == "identity":
        return z.copy()
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "leaky_relu":
        return np.where(z >= 0, z, negative_slope * z)
    if act == "elu":
        return np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0.0)))
    raise ValueError(f"unknown activation {act!r}")


def act_inverse(y: np.ndarray, act: str, negative_slope: float = 0.01, alpha: float = 1.0):
    r"""``(z, dy/dz)`` from the output ``y = act(z)`` alone, for the invertible activations.

    leaky_relu: :math:`z = y` if :math:`y \ge 0` else :math:`y/s`, slope 1 or s;
    elu: :math:`z = y` if :math:`y > 0` else :math:`\log(1 + y/\alpha)`, slope 1 or
    :math:`y + \alpha`; identity: :math:`z = y`, slope 1. ReLU maps every negative z to 0 and
    cannot be inverted.
    """
    y = np.asarray(y, dtype=np.float64)
    if act == "identity":
        return y.copy(), np.ones_like(y)
    if act == "leaky_relu":
        neg = y < 0
        return np.where(neg, y / negative_slope, y), np.where(neg, negative_slope, 1.0)
    if act == "elu":
        pos = y > 0
        return np.where(pos, y, np.log1p(np.where(pos, 0.0, y) / alpha)), np.where(
            pos, 1.0, y + alpha
        )
    raise ValueError(f"activation {act!r} cannot be inverted")


def bn_act_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    act: str,
    eps: float = 1e-5,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> tuple[np.ndarray, Cache]:
    """Training-mode batch norm (channels on axis 1) followed by the activation."""
    z, cache = forward_train(x, gamma, beta, eps, axis=1)
    return act_forward(z, act, negative_slope, alpha), cache


def bn_act_backward(
    dy: np.ndarray,
    y: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    invstd: np.ndarray,
    act: str,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of :func:`bn_act_forward` from its *output* only (In-Place ABN's backward).

    :math:`z = \mathrm{act}^{-1}(y)`, :math:`dz = dy \cdot \mathrm{act}'(z)`,
    :math:`\hat x = (z - \beta)/\gamma` (needs :math:`\gamma \ne 0`), then the batch-norm
    backward of :func:`bnorm.reference.backward` on :math:`(dz, \hat x)`.
    """
    z, slope = act_inverse(y, act, negative_slope, alpha)
    dz = np.asarray(dy, dtype=np.float64) * slope
    nd = z.ndim
    xhat = (z - _per_channel(beta, nd, 1)) / _per_channel(gamma, nd, 1)
    count = z.size // z.shape[1]
    stats = BatchStats(mean=np.zeros(z.shape[1]), var=np.zeros(z.shape[1]), count=count)
    cache = Cache(
        xhat=xhat,
        invstd=np.asarray(invstd, float),
        gamma=np.asarray(gamma, float),
        axis=1,
        stats=stats,
    )
    return backward(dz, cache)


# --------------------------------------------------------------------------- BN-LSTM


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _masked_bn(
    v: np.ndarray,
    valid: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running: dict[str, np.ndarray],
    t: int,
    momentum: float,
    eps: float,
    training: bool,
) -> np.ndarray:
    """Batch norm of the rows of ``v`` (B, F) with statistics over the ``valid`` rows only, and
    the per-step running statistics ``running[...][t]`` updated in place. A step with a single
    valid row is normalized with the running statistics and does not update them."""
    rows = v[valid]
    if training and rows.shape[0] >= 2:
        stats = batch_stats(rows, axis=1)
        mean, var = stats.mean, stats.var
        rm, rv, _ = update_running_stats(
            running["mean"][t], running["var"][t], stats, momentum=momentum
        )
        running["mean"][t], running["var"][t] = rm, rv
    else:
        mean, var = running["mean"][t], running["var"][t]
    return gamma * (v - mean) / np.sqrt(var + eps) + beta


def bnlstm_forward(
    x: np.ndarray,
    lengths: np.ndarray,
    w_ih: np.ndarray,
    w_hh: np.ndarray,
    bias: np.ndarray,
    gammas: tuple[np.ndarray, np.ndarray, np.ndarray],
    beta_c: np.ndarray,
    max_steps: int,
    running: dict[str, dict[str, np.ndarray]],
    momentum: float = 0.1,
    eps: float = 1e-5,
    training: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Batch-normalized LSTM (Cooijmans et al. 2016) over a padded batch, in training mode.

    ``x`` is (T, B, I); sequence b is valid for steps ``t < lengths[b]``. With gates ordered
    (i, f, g, o) as in ``torch.nn.LSTM``:

    .. math::

        (i, f, g, o) = BN(W_{ih} x_t; \gamma_x, t) + BN(W_{hh} h_{t-1}; \gamma_h, t) + b, \qquad
        c_t = \sigma(f) c_{t-1} + \sigma(i) \tanh(g), \qquad
        h_t = \sigma(o) \tanh(BN(c_t; \gamma_c, \beta_c, t)),

    each BN with statistics over the sequences valid at step t, and with its own running
    statistics per step ``min(t, max_steps - 1)`` (``running["x"|"h"|"c"]["mean"|"var"]``,
    arrays (max_steps, F), updated in place). Finished sequences keep their state.
    With ``training=False`` every step normalizes with its running statistics, unchanged.
    Returns ``(output (T, B, H) zero beyond each length, h_n (B, H), c_n (B, H))``.
    """
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    g_x, g_h, g_c = gammas
    zero4 = np.zeros(4 * hidden)
    h = np.zeros((batch, hidden))
    c = np.zeros((batch, hidden))
    out = np.zeros((steps, batch, hidden))
    for t in range(steps):
        valid = lengths > t
        if not valid.any():
            break
        s = min(t, max_steps - 1)
        gates = (
            _masked_bn(x[t] @ w_ih.T, valid, g_x, zero4, running["x"], s, momentum, eps, training)
            + _masked_bn(h @ w_hh.T, valid, g_h, zero4, running["h"], s, momentum, eps, training)
            + bias
        )
        i, f, g, o = np.split(gates, 4, axis=1)
        c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h_new = _sigmoid(o) * np.tanh(
            _masked_bn(c_new, valid, g_c, beta_c, running["c"], s, momentum, eps, training)
        )
        keep = valid[:, None]
        c = np.where(keep, c_new, c)
        h = np.where(keep, h_new, h)
        out[t] = np.where(keep, h_new, 0.0)
    return out, h, c
