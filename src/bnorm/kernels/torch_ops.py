"""Batch-norm kernels written with plain torch tensor ops: the portable fallback.

The four functions are the split every backend implements (see :mod:`bnorm.kernels`):
statistics -> transform -> backward reductions -> backward elementwise. Per-channel
quantities (mean, invstd, reductions) are float64 tensors of shape (C,). ``x`` and ``dy`` are
non-empty, rank >= 2, channels on dim 1, in contiguous or channels_last layout.

Precision: data whose mean is far from zero relative to its spread (a mean of 1e5 sigma in
fp32) loses every digit of its variance if accumulated naively. Here the statistics are taken
on ``x - k`` with ``k`` one sample of each channel, and every elementwise step subtracts ``k`` =
the mean rounded to the compute dtype: near the data, that subtraction is exact (Sterbenz).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["backward_elementwise", "backward_reduce", "statistics", "transform"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    # bf16/fp16 are computed in fp32, as PyTorch's own CPU kernel does.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bshape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _f64(t: Tensor | None, default: float, like: Tensor) -> Tensor:
    if t is None:
        return torch.full_like(like, default, dtype=torch.float64)
    return t.detach().to(torch.float64)


def statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, float64, shape (C,)."""
    xf = x.to(_compute_dtype(x))
    k = xf[(0, slice(None)) + (0,) * (x.dim() - 2)]  # the first value of each channel
    d = xf - k.view(_bshape(x))
    # torch accumulates var_mean on CPU in double (Welford); on the shifted data its fp32 mean
    # is small, so rounding it to fp32 costs nothing that matters.
    var, mean_d = torch.var_mean(d, _dims(x), correction=0)
    return k.double() + mean_d.double(), var.double()


def transform(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``y = (x - mean) * invstd * weight + bias``, in x's dtype and layout.

    Computed as ``(x - k) * scale + (bias - (mean - k) * scale)`` with ``k`` = mean rounded to
    the compute dtype, so the large part of ``x - mean`` is taken exactly.
    """
    cd = _compute_dtype(x)
    shape = _bshape(x)
    k = mean.to(cd)
    scale = invstd * _f64(weight, 1.0, invstd)
    offset = _f64(bias, 0.0, invstd) - (mean - k.double()) * scale
    y = torch.addcmul(offset.to(cd).view(shape), x.to(cd) - k.view(shape), scale.to(cd).view(shape))
    return y.to(x.dtype)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum dy, sum dy * (x - mean))`` per channel, float64."""
    cd = _compute_dtype(x)
    shape, dims = _bshape(x), _dims(x)
    k = mean.to(cd)
    dyf = dy.to(cd)
    sum_dy = dyf.sum(dims).double()
    sum_dy_xk = (dyf * (x.to(cd) - k.view(shape))).sum(dims).double()
    return sum_dy, sum_dy_xk - (mean - k.double()) * sum_dy


def backward_elementwise(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: int,
) -> Tensor:
    """Input gradient of training-mode batch norm, from the reductions of :func:`backward_reduce`.

    ``dx = a*dy + b*(x - mean) + c0`` with ``a = weight*invstd``,
    ``b = -a*invstd**2*sum_dy_xmu/count`` and ``c0 = -a*sum_dy/count``; written around the
    shift ``k`` like :func:`transform`.
    """
    cd = _compute_dtype(x)
    shape = _bshape(x)
    k = mean.to(cd)
    a = _f64(weight, 1.0, invstd) * invstd
    b = -a * invstd * invstd * sum_dy_xmu / count
    c = -a * sum_dy / count - b * (mean - k.double())
    dx = torch.addcmul(c.to(cd).view(shape), x.to(cd) - k.view(shape), b.to(cd).view(shape))
    dx = torch.addcmul(dx, dy.to(cd), a.to(cd).view(shape))
    return dx.to(x.dtype)
