"""Batch-norm kernels compiled with numba: multi-threaded CPU loops near the memory floor.

Two sets of functions share the compiled loops of :mod:`bnorm.kernels._numba_loops`:

- the **four steps** of :mod:`bnorm.kernels` (``statistics``, ``transform``,
  ``backward_reduce``, ``backward_elementwise``), which SyncBatchNorm and the remedies call one
  by one with their own math or collectives in between;
- the **fused** hot paths of :mod:`bnorm.functional`: :func:`train_forward` (statistics,
  running-statistics update and output in one call), :func:`eval_forward` (one pass) and
  :func:`train_backward` (both reductions and the input gradient in one call).

Memory traffic: the training forward reads x twice and writes y; the backward reads dy and x
twice and writes dx; evaluation reads x once and writes y. That is the floor for batch norm
(about four copies of the input for forward+backward, one for evaluation).

Precision (see :mod:`bnorm.kernels._numba_loops`): statistics are float64 sums around a sample
of each channel, elementwise steps subtract the mean rounded to the data's dtype first, so data
whose mean is 1e5 standard deviations from zero keeps its digits.

Dtypes: float32 and float64 run compiled loops in their own dtype. bfloat16/float16 (numba has
no such types) are widened to float32 by torch, computed in float32 (statistics in float64),
and the output is rounded back: two extra passes over a half-size tensor.

Threads: the loops use ``torch.get_num_threads()`` threads (capped by numba's pool), so
``torch.set_num_threads`` governs both. Tensors below :data:`PARALLEL_MIN_NUMEL` elements run
on the calling thread: waking the pool costs more than they take.

Overhead: the compiled entry points take addresses (``tensor.data_ptr()``) and sizes, so a call
costs about a microsecond of Python; no NumPy array is made on the hot paths.
"""

from __future__ import annotations

import numba
import torch
from torch import Tensor

from . import _numba_loops as loops
from . import buffers, torch_ops

__all__ = [
    "PARALLEL_MIN_NUMEL",
    "backward_elementwise",
    "backward_reduce",
    "eval_forward",
    "fused_buffers_ok",
    "geometry",
    "statistics",
    "supports",
    "train_backward",
    "train_forward",
    "transform",
]

#: below this many elements a kernel runs on the calling thread (measured: a parallel launch
#: costs 1-2 microseconds, about what 2 threads gain on 32K fp32 elements).
PARALLEL_MIN_NUMEL = 1 << 15

_COMPILED = (torch.float32, torch.float64)
_WIDENED = (torch.bfloat16, torch.float16)


def supports(x: Tensor) -> bool:
    """Whether this backend computes ``x`` itself (CPU, float32/float64/bfloat16/float16)."""
    return x.is_cpu and x.dtype in _COMPILED + _WIDENED


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


def _threads(numel: int) -> int:
    """Threads for a kernel over ``numel`` values: 1 for small tensors, else torch's count."""
    if numel < PARALLEL_MIN_NUMEL:
        return 1
    if not _pool_started:
        _start_pool()
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:  # thread-local in numba; a parallel call needs it set
        numba.set_num_threads(want)
    return want


def geometry(x: Tensor) -> tuple[int, int, int]:
    """``(A, C, B)``: how the loops see a non-empty tensor in a supported layout.

    Contiguous ``(N, C, *)``: ``(N, C, prod(*))``; channels_last(_3d): ``(N * prod(*), C, 1)``
    (the channel varies fastest in memory).
    """
    c = x.shape[1]
    if x.is_contiguous():
        a = x.shape[0]
        return a, c, x.numel() // (a * c)
    return x.numel() // c, c, 1


def _layout(x: Tensor) -> Tensor:
    """``x`` in a layout the loops take: contiguous, or channels_last(_3d)."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _like(t: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` (x's shape: an incoming gradient) dense in x's layout and of ``dtype``."""
    t = t.to(dtype)
    if x.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _compute(x: Tensor) -> Tensor:
    return x if x.dtype in _COMPILED else x.to(torch.float32)


def _per_channel(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` as a dense (C,) tensor of ``dtype`` (the same tensor when it already is one)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.detach().to(dtype).contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64).contiguous()


# --- the four steps ----------------------------------------------------------------------------


def statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, float64, shape (C,)."""
    if x.numel() == 0:
        return torch_ops.statistics(x)
    x = _compute(_layout(x))
    a, c, b = geometry(x)
    out = torch.empty((2, c), dtype=torch.float64)
    kernel = loops.statistics_f32 if x.dtype == torch.float32 else loops.statistics_f64
    kernel(x.data_ptr(), a, c, b, out.data_ptr(), _threads(x.numel()))
    return out[0], out[1]


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
    a, c, b = geometry(x)
    y = buffers.empty_like(x)
    m, s = _f64(mean), _f64(invstd)
    w = None if weight is None else _f64(weight)
    bb = None if bias is None else _f64(bias)
    flags = (w is not None) | (bb is not None) << 1
    kernel = loops.transform_f32 if x.dtype == torch.float32 else loops.transform_f64
    kernel(
        x.data_ptr(), y.data_ptr(), a, c, b, m.data_ptr(), s.data_ptr(), _ptr(w), _ptr(bb),
        flags, _threads(x.numel()),
    )  # fmt: skip
    return y if y.dtype == x_in.dtype else y.to(x_in.dtype)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum dy, sum dy * (x - mean))`` per channel, float64, one pass over dy and x."""
    if x.numel() == 0:
        return torch_ops.backward_reduce(dy, x, mean)
    x = _compute(_layout(x))
    dy = _like(dy, x, x.dtype)
    a, c, b = geometry(x)
    m = _f64(mean)
    out = torch.empty((2, c), dtype=torch.float64)
    kernel = loops.backward_reduce_f32 if x.dtype == torch.float32 else loops.backward_reduce_f64
    kernel(dy.data_ptr(), x.data_ptr(), a, c, b, m.data_ptr(), out.data_ptr(), _threads(x.numel()))
    return out[0], out[1]


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
    around the shift ``k`` like :func:`transform`. ``count`` is the number of values per channel
    the sums were taken over (across every process under SyncBatchNorm).
    """
    if x.numel() == 0:
        return torch_ops.backward_elementwise(
            dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count
        )
    x_in = _layout(x)
    x = _compute(x_in)
    dy = _like(dy, x, x.dtype)
    a, c, b = geometry(x)
    m, s = _f64(mean), _f64(invstd)
    w = None if weight is None else _f64(weight)
    sums = torch.stack([_f64(sum_dy), _f64(sum_dy_xmu)])
    dx = buffers.empty_like(x)
    kernel = (
        loops.backward_elementwise_f32
        if x.dtype == torch.float32
        else loops.backward_elementwise_f64
    )
    kernel(
        dy.data_ptr(), x.data_ptr(), a, c, b, m.data_ptr(), s.data_ptr(), _ptr(w),
        int(w is not None), sums.data_ptr(), count, dx.data_ptr(), _threads(x.numel()),
    )  # fmt: skip
    return dx if dx.dtype == x_in.dtype else dx.to(x_in.dtype)


# --- fused steps: one compiled call per forward or backward ------------------------------------
# bnorm.functional uses these on its hot paths. Per-channel math happens inside the compiled
# call, so a small tensor pays one dispatch instead of a dozen small torch ops.


def fused_buffers_ok(x: Tensor, *buffers_: Tensor | None) -> bool:
    """Whether running-statistics buffers can be updated in place by the fused kernels: they
    must be contiguous CPU tensors of the compute dtype of ``x``."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return all(t is None or (t.dtype == dtype and t.is_cpu and t.is_contiguous()) for t in buffers_)


def train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, bool]:
    """Training forward in one compiled call: statistics, running update, normalization.

    ``running_mean`` and ``running_var`` are both given (updated in place, as
    :func:`bnorm.functional.update_running_stats` does; check :func:`fused_buffers_ok` first) or
    both ``None``; ``momentum=None`` (cumulative average) needs ``num_batches_tracked``, an int64
    tensor advanced by one. Returns ``(y, stats, finite)``: ``stats`` is a float64 (2, C)
    tensor holding the batch mean and ``1/sqrt(var + eps)``; for a non-finite batch nothing is
    updated and ``finite`` is False (the caller warns or raises).
    """
    x_in = _layout(x)
    x = _compute(x_in)
    a, c, b = geometry(x)
    dt = x.dtype
    y = buffers.empty_like(x)
    stats = torch.empty((2, c), dtype=torch.float64)
    w, bb = _per_channel(weight, dt), _per_channel(bias, dt)
    has_running = running_mean is not None
    nbt = num_batches_tracked if has_running else None
    if nbt is not None and not (nbt.dtype == torch.int64 and nbt.is_cpu and nbt.numel() == 1):
        raise TypeError(
            f"num_batches_tracked must be a one-element int64 CPU tensor, got {nbt.dtype} "
            f"of shape {tuple(nbt.shape)} on {nbt.device}"
        )
    flags = (
        (w is not None)
        | (bb is not None) << 1
        | has_running << 2
        | (nbt is not None) << 3
        | (momentum is None) << 4
    )
    kernel = loops.train_forward_f32 if dt == torch.float32 else loops.train_forward_f64
    finite = kernel(
        x.data_ptr(), y.data_ptr(), a, c, b, _ptr(w), _ptr(bb), _ptr(running_mean),
        _ptr(running_var), _ptr(nbt), flags, 0.0 if momentum is None else float(momentum),
        float(eps), stats.data_ptr(), _threads(x.numel()),
    )  # fmt: skip
    if y.dtype != x_in.dtype:
        y = y.to(x_in.dtype)
    return y, stats, bool(finite)


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
    a, c, b = geometry(x)
    dt = x.dtype
    y = buffers.empty_like(x)
    rm, rv = _per_channel(running_mean, dt), _per_channel(running_var, dt)
    w, bb = _per_channel(weight, dt), _per_channel(bias, dt)
    flags = (w is not None) | (bb is not None) << 1
    kernel = loops.eval_forward_f32 if dt == torch.float32 else loops.eval_forward_f64
    kernel(
        x.data_ptr(), y.data_ptr(), a, c, b, _ptr(rm), _ptr(rv), _ptr(w), _ptr(bb), flags,
        float(eps), _threads(x.numel()),
    )  # fmt: skip
    return y if y.dtype == x_in.dtype else y.to(x_in.dtype)


def train_backward(
    dy: Tensor,
    x: Tensor,
    stats: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of training-mode batch norm in one compiled call: ``(dx, dweight, dbias)``
    (``None`` where ``needs`` says it is not wanted), each in its tensor's dtype.

    ``stats`` is :func:`train_forward`'s (2, C) float64 mean and invstd.
    ``dweight = sum(dy * (x - mean)) * invstd`` and ``dbias = sum(dy)``; ``dx`` as in
    :func:`backward_elementwise` with ``count`` = the values per channel of ``x``.
    """
    need_x, need_w, need_b = needs
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None
    x_in = _layout(x)
    x = _compute(x_in)
    dt = x.dtype
    dy = _like(dy, x, dt)
    a, c, b = geometry(x)
    w = _per_channel(weight, dt)
    dx = buffers.empty_like(x) if need_x else None
    dw = torch.empty(c, dtype=dt) if need_w else None
    db = torch.empty(c, dtype=dt) if need_b else None
    flags = (w is not None) | need_w << 1 | need_b << 2 | need_x << 3
    kernel = loops.train_backward_f32 if dt == torch.float32 else loops.train_backward_f64
    kernel(
        dy.data_ptr(), x.data_ptr(), a, c, b, stats.data_ptr(), _ptr(w), flags, _ptr(dx),
        _ptr(dw), _ptr(db), _threads(x.numel()),
    )  # fmt: skip
    if dx is not None and dx.dtype != x_in.dtype:
        dx = dx.to(x_in.dtype)
    if dw is not None and weight is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if db is not None and bias is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return dx, dw, db
