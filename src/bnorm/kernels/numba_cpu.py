"""Batch-norm kernels compiled with numba: multi-threaded CPU loops near the memory floor.

The four functions follow the contract of :mod:`bnorm.kernels` (statistics -> transform ->
backward reductions -> backward elementwise) and the precision scheme of
:mod:`bnorm.kernels.torch_ops`: statistics are float64 sums of ``x - k`` with ``k`` a sample of
each channel, merged across threads by adding per-thread partial sums (same shift, so no
correction term; float64 rounding only); every elementwise step subtracts ``k`` = the mean
rounded to the compute dtype first, which is exact near the data.

Each step is one pass over memory: statistics read x once; the transform reads x and writes y;
the backward reductions read dy and x once; the input gradient reads dy and x and writes dx. So
training forward+backward moves about four copies of the input, the floor for batch norm, and
evaluation (one transform) one copy.

Dtypes: float32 and float64 run compiled loops in their own dtype. bfloat16/float16 (numba has
no such types) are widened to float32 by torch, computed in float32 (statistics in float64), and
the output is rounded back: two extra passes over a half-size tensor, the price of not
compiling bit-twiddling variants of every loop.

Threads: numba's thread count follows ``torch.get_num_threads()`` (capped by numba's own pool),
so ``torch.set_num_threads`` governs both. Tensors below :data:`PARALLEL_MIN_NUMEL` elements run
on one thread: waking the pool costs more than they take.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from . import _numba_loops as loops
from . import torch_ops

__all__ = [
    "PARALLEL_MIN_NUMEL",
    "backward_elementwise",
    "backward_reduce",
    "statistics",
    "supports",
    "transform",
]

#: below this many elements a kernel runs single-threaded (measured: a thread launch costs
#: a few microseconds, about what 2 threads gain on 32K fp32 elements).
PARALLEL_MIN_NUMEL = 1 << 15

_COMPILED = (torch.float32, torch.float64)
_WIDENED = (torch.bfloat16, torch.float16)


def supports(x: Tensor) -> bool:
    """Whether this backend computes ``x`` itself (CPU, float32/float64/bfloat16/float16)."""
    return x.device.type == "cpu" and x.dtype in _COMPILED + _WIDENED


_pool_started = False


def _start_pool() -> None:
    # With numba's OpenMP threading layer, the first parallel launch sets the process-wide
    # OpenMP thread count, which torch shares: it would silently undo the user's
    # torch.set_num_threads. Start the pool once, on purpose, and restore torch's count.
    global _pool_started
    threads = torch.get_num_threads()
    loops.start_pool(2)
    torch.set_num_threads(threads)
    _pool_started = True


def _nchunks(numel: int) -> int:
    """Chunks for the channel-innermost loops; also sizes numba's (thread-local) pool: one
    thread for small tensors, torch's thread count otherwise."""
    if not _pool_started:
        _start_pool()
    want = 1
    if numel >= PARALLEL_MIN_NUMEL:
        want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
    return want


def _is_channels_last(x: Tensor) -> bool:
    # Contiguous wins when both hold (C == 1 or spatial size 1): the views then agree anyway.
    return x.dim() >= 4 and not x.is_contiguous()


def _layout(x: Tensor) -> Tensor:
    """``x`` in a layout the loops take: contiguous, or channels_last(_3d)."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (same shape as x) in x's layout."""
    if _is_channels_last(x):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    return t.contiguous()


def _empty(x: Tensor, dtype: torch.dtype) -> Tensor:
    # empty_like keeps the strides of a dense tensor, so the output is viewed like the input
    return torch.empty_like(x, dtype=dtype)


def _view3(t: Tensor, channels_last: bool) -> np.ndarray:
    """The (A, C, B) C-contiguous NumPy view of ``t`` the loops take (see _numba_loops)."""
    a = t.detach().numpy()  # NumPy reshapes are cheaper than torch's for this glue
    if channels_last:
        a = a.transpose(0, *range(2, a.ndim), 1)  # (N, *, C): C-contiguous for channels_last
        return a.reshape(-1, a.shape[-1], 1)
    return a.reshape(a.shape[0], a.shape[1], -1)


def _compute(x: Tensor) -> Tensor:
    return x if x.dtype in _COMPILED else x.to(torch.float32)


def _f64(t: Tensor | None, default: float, channels: int) -> np.ndarray:
    if t is None:
        return np.full(channels, default)
    return t.detach().to(torch.float64).numpy()


def statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, float64, shape (C,)."""
    if x.numel() == 0:
        return torch_ops.statistics(x)
    x = _compute(_layout(x))
    xv = _view3(x, _is_channels_last(x))
    k = xv[0, :, 0].astype(np.float64)  # the first value of each channel: near its data
    n = xv.shape[0] * xv.shape[2]
    s1, s2 = loops.shifted_sums(xv, k, _nchunks(x.numel()))
    with np.errstate(invalid="ignore"):  # Inf - Inf: the batch is non-finite, NaN says so
        mean_d = s1 / n
        var = np.maximum(s2 / n - mean_d * mean_d, 0.0)
    return torch.from_numpy(k + mean_d), torch.from_numpy(var)


def _shift(mean: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``k`` = mean rounded to the compute dtype, and ``mean - k`` in float64."""
    k = mean.astype(dtype)
    return k, mean - k.astype(np.float64)


def transform(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``y = (x - mean) * invstd * weight + bias`` in x's dtype and layout, one pass.

    Computed as ``(x - k) * scale + (bias - (mean - k) * scale)`` with ``k`` the mean rounded to
    the compute dtype, so the large part of ``x - mean`` is taken exactly.
    """
    if x.numel() == 0:  # empty batches (the layers' N == 0 case) need no loop
        return torch_ops.transform(x, mean, invstd, weight, bias)
    x_in = _layout(x)
    x = _compute(x_in)
    cl = _is_channels_last(x)
    channels = x.shape[1]
    dt = _view3(x, cl).dtype
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite statistics stay NaN/Inf
        scale = _f64(invstd, 1.0, channels) * _f64(weight, 1.0, channels)
        k, delta = _shift(_f64(mean, 0.0, channels), dt)
        offset = _f64(bias, 0.0, channels) - delta * scale
    y = _empty(x, x.dtype)
    loops.shifted_affine(
        _view3(x, cl),
        k,
        scale.astype(dt),
        offset.astype(dt),
        _view3(y, cl),
        _nchunks(x.numel()),
    )
    return y if y.dtype == x_in.dtype else y.to(x_in.dtype)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum dy, sum dy * (x - mean))`` per channel, float64, one pass over dy and x."""
    if x.numel() == 0:
        return torch_ops.backward_reduce(dy, x, mean)
    x = _compute(_layout(x))
    cl = _is_channels_last(x)
    dy = _compute(_like(dy, x))
    mean_np = _f64(mean, 0.0, x.shape[1])
    k = mean_np  # float64 sums: any shift near the data is exact enough; the mean is one
    sum_dy, sum_dy_xmu = loops.grad_sums(_view3(dy, cl), _view3(x, cl), k, _nchunks(x.numel()))
    return torch.from_numpy(sum_dy), torch.from_numpy(sum_dy_xmu)


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
    """Input gradient of training-mode batch norm from :func:`backward_reduce`'s sums.

    ``dx = a*dy + b*(x - mean) + c0`` with ``a = weight*invstd``,
    ``b = -a*invstd**2*sum_dy_xmu/count`` and ``c0 = -a*sum_dy/count``; one pass, written
    around the shift ``k`` like :func:`transform`.
    """
    if x.numel() == 0:
        return torch_ops.backward_elementwise(
            dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count
        )
    x_in = _layout(x)
    x = _compute(x_in)
    cl = _is_channels_last(x)
    dy = _compute(_like(dy, x))
    channels = x.shape[1]
    dt = _view3(x, cl).dtype
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite statistics stay NaN/Inf
        istd = _f64(invstd, 1.0, channels)
        a = _f64(weight, 1.0, channels) * istd
        b = -a * istd * istd * _f64(sum_dy_xmu, 0.0, channels) / count
        k, delta = _shift(_f64(mean, 0.0, channels), dt)
        c = -a * _f64(sum_dy, 0.0, channels) / count - b * delta
    dx = _empty(x, x.dtype)
    loops.input_grad(
        _view3(dy, cl),
        _view3(x, cl),
        k,
        a.astype(dt),
        b.astype(dt),
        c.astype(dt),
        _view3(dx, cl),
        _nchunks(x.numel()),
    )
    return dx if dx.dtype == x_in.dtype else dx.to(x_in.dtype)


# --- fused steps: one compiled call per forward or backward ---------------------------------
# bnorm.functional uses these on its hot paths (the four functions above stay the contract that
# distributed code calls step by step). Per-channel math happens inside the compiled call, so a
# tiny tensor pays one dispatch instead of a dozen small torch ops.


def _per_channel(t: Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """A (C,) NumPy array of ``dtype`` (length 0 for ``None``); a view when no cast is needed."""
    if t is None:
        return np.empty(0, dtype=np.float32 if dtype == torch.float32 else np.float64)
    if t.dtype == dtype and t.dim() == 1 and t.is_contiguous():
        return t.detach().numpy()
    return t.detach().to(dtype).contiguous().reshape(-1).numpy()


def fused_buffers_ok(x: Tensor, *buffers: Tensor | None) -> bool:
    """Whether running-statistics buffers can be updated in place by the fused kernels: they
    must be contiguous CPU tensors of the compute dtype of ``x``."""
    dtype = _compute_dtype(x)
    return all(
        t is None or (t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous())
        for t in buffers
    )


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Training forward in one compiled call: statistics, running update, normalization.

    ``running_mean`` and ``running_var`` are both given (updated in place, see
    :func:`bnorm.functional.update_running_stats`; check :func:`fused_buffers_ok` first) or
    both ``None``; ``momentum=None`` needs ``num_batches_tracked``. Returns
    ``(y, mean, invstd, finite)``; for a non-finite batch nothing is updated and ``finite`` is
    False (the caller warns or raises).
    """
    x_in = _layout(x)
    x = _compute(x_in)
    cl = _is_channels_last(x)
    dt = x.dtype
    y = _empty(x, dt)
    nbt = (
        num_batches_tracked.detach().numpy().reshape(1)  # a view: incremented in place
        if num_batches_tracked is not None and running_mean is not None
        else np.empty(0, dtype=np.int64)
    )
    mean, invstd, finite = loops.train_forward(
        _view3(x, cl),
        _per_channel(weight, dt),
        _per_channel(bias, dt),
        _per_channel(running_mean, dt),
        _per_channel(running_var, dt),
        nbt,
        0.0 if momentum is None else float(momentum),
        momentum is None,
        float(eps),
        _view3(y, cl),
        _nchunks(x.numel()),
    )
    if y.dtype != x_in.dtype:
        y = y.to(x_in.dtype)
    return y, torch.from_numpy(mean), torch.from_numpy(invstd), bool(finite)


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``: one fused pass."""
    x_in = _layout(x)
    x = _compute(x_in)
    cl = _is_channels_last(x)
    dt = x.dtype
    y = _empty(x, dt)
    loops.eval_forward(
        _view3(x, cl),
        _per_channel(running_mean, dt),
        _per_channel(running_var, dt),
        _per_channel(weight, dt),
        _per_channel(bias, dt),
        float(eps),
        _view3(y, cl),
        _nchunks(x.numel()),
    )
    return y if y.dtype == x_in.dtype else y.to(x_in.dtype)


def train_backward_grads(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of training-mode batch norm in one compiled call: ``(dx, dweight, dbias)``
    (``None`` where not needed), the parameter gradients in the parameters' dtypes.

    ``dweight = sum(dy * (x - mean)) * invstd`` and ``dbias = sum(dy)``; ``dx`` as in
    :func:`backward_elementwise`.
    """
    need_x, need_w, need_b = needs
    dx, sum_dy, sum_dy_xmu = _train_backward_np(dy, x, mean, invstd, weight, need_x)
    dweight = dbias = None
    if need_w and weight is not None:
        dweight = _to_dtype(sum_dy_xmu * invstd.numpy(), weight.dtype)
    if need_b and bias is not None:
        dbias = _to_dtype(sum_dy, bias.dtype)
    return dx, dweight, dbias


def _to_dtype(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float32:
        return torch.from_numpy(a.astype(np.float32))
    return torch.from_numpy(a).to(dtype)


def _train_backward_np(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, need_dx: bool
) -> tuple[Tensor | None, np.ndarray, np.ndarray]:
    x_in = _layout(x)
    x = _compute(x_in)
    cl = _is_channels_last(x)
    dy = _compute(_like(dy, x))
    dt = x.dtype
    xv = _view3(x, cl)
    dx = _empty(x, dt) if need_dx else None
    sum_dy, sum_dy_xmu = loops.train_backward(
        _view3(dy, cl),
        xv,
        _per_channel(mean, torch.float64),
        _per_channel(invstd, torch.float64),
        _per_channel(weight, dt),
        _view3(dx, cl) if dx is not None else np.empty((0, 0, 0), dtype=xv.dtype),
        _nchunks(x.numel()),
    )
    if dx is not None and dx.dtype != x_in.dtype:
        dx = dx.to(x_in.dtype)
    return dx, sum_dy, sum_dy_xmu
