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
of each channel, elementwise steps subtract the mean rounded to the data's dtype first (where
the mean is far from zero: see ``_numba_loops.DIRECT_MAX``), so data whose mean is 1e5
standard deviations from zero keeps its digits.

Dtypes: float32 and float64 run compiled loops in their own dtype. bfloat16/float16 (numba has
no such types) are widened to float32 by torch, computed in float32 (statistics in float64),
and the output is rounded back: two extra passes over a half-size tensor.

Threads: the loops use ``torch.get_num_threads()`` threads (capped by numba's pool), so
``torch.set_num_threads`` governs both. Tensors below :data:`PARALLEL_MIN_NUMEL` elements run
on the calling thread: waking the pool costs more than they take. Where torch uses GNU OpenMP
(its Linux wheels), the loops run on torch's own OpenMP thread pool, else on numba's (see
``_numba_loops``, "torch's OpenMP thread pool"); ``BNORM_TORCH_POOL=0`` chooses numba's.

Channel blocks: the training passes of contiguous (N, C, ...) data with long spatial runs can
fuse their two passes per block of channels (``_numba_loops.channel_block``); whether they do
depends on the processor (:data:`RUN_BLOCK_BYTES`, ``BNORM_CHANNEL_BLOCKS``).

Overhead: the compiled entry points take addresses (``tensor.data_ptr()``) and sizes, so a call
costs about a microsecond of Python; no NumPy array is made on the hot paths.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import numba
import numpy as np
import torch
from torch import Tensor

from .. import _platform
from . import _numba_loops as loops
from . import buffers, torch_ops

__all__ = [
    "PARALLEL_MIN_NUMEL",
    "RUN_BLOCK_BYTES",
    "backward_elementwise",
    "backward_reduce",
    "eval_backward",
    "eval_forward",
    "eval_forward_checked",
    "fused_buffers_ok",
    "geometry",
    "statistics",
    "supports",
    "thread_pool",
    "train_backward",
    "train_forward",
    "transform",
    "update_from_batch",
]

#: below this many elements a kernel runs on the calling thread (measured: a parallel launch
#: costs 1-2 microseconds, about what 2 threads gain on 32K fp32 elements).
PARALLEL_MIN_NUMEL = 1 << 15


def _run_block_bytes() -> int:
    """The run family's channel-block budget: ``BNORM_CHANNEL_BLOCKS=1`` (blocks) or ``0``
    (the two-pass loops) if set, else blocks on Intel processors only.

    Measured (float32, 2 threads): on the Intel machines (2 MB L2 per core) the blocks made the
    12 MB NCHW forward 1.33 -> 1.19 ms and the backward 1.81 -> 1.48 ms. On the AMD machines
    (Zen 4, 1 MB L2 per core, 32 MB L3) the training step without them took 0.84-0.96x the time
    on 12 MB NCHW, 0.78-0.86x on 6 MB, 0.76-0.96x on (N, C, L) 8 MB, 0.92-0.94x on 1 MB and 1.00x
    on 98 MB (``benchmarks/channel_blocks.py``: both alternating in one process, three runs), and
    blocks of 256 KB or 4 MB did not do better overall. Other processors are unmeasured and take
    the two-pass loops.
    """
    env = os.environ.get("BNORM_CHANNEL_BLOCKS")
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"BNORM_CHANNEL_BLOCKS must be 0 or 1, got {env!r}")
        return loops.BLOCK_BYTES if env == "1" else 0
    return loops.BLOCK_BYTES if _platform.cpu_vendor() == "intel" else 0


#: bytes a channel block of the training passes may hold for runs of ``RUN_MIN`` values and more
#: (0: no blocks there, the two-pass loops run); read at every call, so it can be changed at run
#: time. Wide blocks (short runs, small batches) do not depend on it.
RUN_BLOCK_BYTES = _run_block_bytes()

_COMPILED = (torch.float32, torch.float64)
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS
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


def _torch_openmp() -> np.ndarray | None:
    """The addresses of ``GOMP_parallel``, ``omp_get_thread_num``, ``omp_get_num_threads`` and
    ``GOMP_barrier`` in the OpenMP runtime that torch's own kernels run on (int64 array of
    four), or ``None``:
    torch not built with GNU OpenMP (its wheels for Linux are), the runtime not found among
    torch's libraries, or ``BNORM_TORCH_POOL=0``.

    bnorm's loops then run on torch's thread pool rather than numba's (see ``_numba_loops``,
    "torch's OpenMP thread pool"). Only a runtime the process has already loaded is taken
    (``RTLD_NOLOAD``): the one torch's libraries loaded.
    """
    if os.environ.get("BNORM_TORCH_POOL", "1") == "0" or not hasattr(os, "RTLD_NOLOAD"):
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    root = os.path.dirname(torch.__file__)
    candidates = glob.glob(os.path.join(root, "lib", "libgomp*.so*"))
    candidates += glob.glob(os.path.join(os.path.dirname(root), "torch.libs", "libgomp*.so*"))
    for path in sorted(candidates):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            functions = (
                lib.GOMP_parallel, lib.omp_get_thread_num, lib.omp_get_num_threads,
                lib.GOMP_barrier,
            )  # fmt: skip
        except (OSError, AttributeError):
            continue
        addresses = [ctypes.cast(f, ctypes.c_void_p).value for f in functions]
        return np.array(addresses, dtype=np.int64)
    return None


_TORCH_OPENMP = _torch_openmp()
#: per compute dtype, the ``pomp`` argument of the loops: the address of the table
#: [GOMP_parallel, omp_get_thread_num, omp_get_num_threads, the seven shares, GOMP_barrier]
#: (kept alive in _tables), or 0 for numba's pool; made at the first kernel call of that dtype
#: (compiling the shares)
_pools: dict[torch.dtype, int] = {}
_tables: list[np.ndarray] = []


def _pool(dtype: torch.dtype) -> int:
    at = _pools.get(dtype)
    if at is None:
        at = 0
        if _TORCH_OPENMP is not None:
            shares = np.array(loops.shares(dtype is torch.float32), np.int64)
            table = np.concatenate([_TORCH_OPENMP[:3], shares, _TORCH_OPENMP[3:]])
            _tables.append(table)
            at = table.ctypes.data
        _pools[dtype] = at
    return at


def thread_pool() -> str:
    """The thread pool bnorm's kernels run on: ``"torch's OpenMP pool"`` or ``"numba's
    pool"``."""
    return "torch's OpenMP pool" if _TORCH_OPENMP is not None else "numba's pool"


_numba_threads = threading.local()  # the count this thread last gave numba (thread-local too)


def _threads(numel: int) -> int:
    """Threads for a kernel over ``numel`` values: 1 for small tensors, else torch's count.

    Called before every kernel: the first call of any parallel numba function starts numba's
    threading layer, even one that then runs on the calling thread, so the pool is started
    here, on purpose, before that (see _start_pool)."""
    if not _pool_started:
        _start_pool()
    if numel < PARALLEL_MIN_NUMEL:
        return 1
    want = torch.get_num_threads()
    if want > _MAX_THREADS:
        want = _MAX_THREADS
    # numba's count matters only on numba's pool. It is per calling thread, and asking numba
    # costs a microsecond: remember what this thread set (a user who calls
    # numba.set_num_threads directly only changes how many threads share the same chunks)
    if _TORCH_OPENMP is None and getattr(_numba_threads, "count", 0) != want:
        numba.set_num_threads(want)
        _numba_threads.count = want
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


def _same_shape(dy: Tensor, x: Tensor) -> None:
    # the loops read dy at x's offsets: another shape would read past dy's end
    if dy.shape != x.shape:
        raise ValueError(
            f"batch norm backward: the gradient has shape {tuple(dy.shape)}, the input "
            f"{tuple(x.shape)}; they must be equal"
        )


def _channels(step: str, c: int, tensors: dict[str, Tensor | None]) -> None:
    # the loops read C values of each per-channel tensor: fewer would read past its end (the
    # layers and bnorm.functional check first; this keeps direct calls of a step safe too)
    for name, t in tensors.items():
        if t is not None and t.numel() != c:
            raise ValueError(
                f"bnorm.kernels.numba_cpu.{step}: {name} should contain {c} elements (one per "
                f"channel), got {t.numel()}"
            )


def _like(t: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` (x's shape: an incoming gradient) dense in x's layout and of ``dtype``."""
    _same_shape(t, x)
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
    kernel(x.data_ptr(), a, c, b, out.data_ptr(), _threads(x.numel()), _pool(x.dtype))
    return out[0], out[1]


def transform(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``y = (x - mean) * invstd * weight + bias`` in x's dtype and layout, one pass.

    Computed as ``(x - k) * scale + (bias - (mean - k) * scale)`` with ``k`` the mean rounded to
    the compute dtype, so the large part of ``x - mean`` is taken exactly (``k = 0`` for short
    runs whose mean is near zero: see ``_numba_loops.DIRECT_MAX``).
    """
    if x.numel() == 0:  # empty batches (the layers' N == 0 case) need no loop
        return torch_ops.transform(x, mean, invstd, weight, bias)
    x_in = _layout(x)
    x = _compute(x_in)
    a, c, b = geometry(x)
    _channels("transform", c, {"mean": mean, "invstd": invstd, "weight": weight, "bias": bias})
    y = buffers.empty_like(x)
    m, s = _f64(mean), _f64(invstd)
    w = None if weight is None else _f64(weight)
    bb = None if bias is None else _f64(bias)
    flags = (w is not None) | (bb is not None) << 1
    kernel = loops.transform_f32 if x.dtype == torch.float32 else loops.transform_f64
    kernel(
        x.data_ptr(), y.data_ptr(), a, c, b, m.data_ptr(), s.data_ptr(), _ptr(w), _ptr(bb),
        flags, _threads(x.numel()), _pool(x.dtype),
    )  # fmt: skip
    return y if y.dtype == x_in.dtype else y.to(x_in.dtype)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum dy, sum dy * (x - mean))`` per channel, float64, one pass over dy and x."""
    if x.numel() == 0:
        return torch_ops.backward_reduce(dy, x, mean)
    x = _compute(_layout(x))
    dy = _like(dy, x, x.dtype)
    a, c, b = geometry(x)
    _channels("backward_reduce", c, {"mean": mean})
    m = _f64(mean)
    out = torch.empty((2, c), dtype=torch.float64)
    kernel = loops.backward_reduce_f32 if x.dtype == torch.float32 else loops.backward_reduce_f64
    kernel(
        dy.data_ptr(), x.data_ptr(), a, c, b, m.data_ptr(), out.data_ptr(), _threads(x.numel()),
        _pool(x.dtype),
    )  # fmt: skip
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
    _channels(
        "backward_elementwise",
        c,
        {"mean": mean, "invstd": invstd, "weight": weight, "sum_dy": sum_dy,
         "sum_dy_xmu": sum_dy_xmu},
    )  # fmt: skip
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
        _pool(x.dtype),
    )  # fmt: skip
    return dx if dx.dtype == x_in.dtype else dx.to(x_in.dtype)


# --- fused steps: one compiled call per forward or backward ------------------------------------
# bnorm.functional uses these on its hot paths. Per-channel math happens inside the compiled
# call, so a small tensor pays one dispatch instead of a dozen small torch ops; the Python here
# is kept to what a call needs (a few attribute reads per tensor), because for the small tensors
# of a small network it costs more than the loops.

_F32 = torch.float32
_F64 = torch.float64


def fused_buffers_ok(x: Tensor, *buffers_: Tensor | None) -> bool:
    """Whether per-channel tensors can be read (and running statistics updated in place) by the
    fused kernels: contiguous CPU tensors of the compute dtype of ``x``."""
    dtype = _F64 if x.dtype is _F64 else _F32
    return all(t is None or (t.dtype is dtype and t.is_cpu and t.is_contiguous()) for t in buffers_)


def _prepare(x: Tensor) -> tuple[Tensor, int, int, int, int]:
    """``(x, A, C, B, threads)``: x in a layout and dtype the loops take, and how they see it."""
    if x.dtype is not _F32 and x.dtype is not _F64:
        x = x.to(_F32)
    c = x.shape[1]
    n = x.numel()
    if x.is_contiguous():
        a = x.shape[0]
        b = n // (a * c)
    else:
        x = _layout(x)
        if x.is_contiguous():
            a = x.shape[0]
            b = n // (a * c)
        else:
            a, b = n // c, 1
    return x, a, c, b, _threads(n)


def _checked_per_channel(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # weight/bias may be float32 for a float64 input only through the step-by-step functions;
    # here a mismatch means a half-precision input with float32 parameters (read as is)
    if t is None or (t.dtype is dtype and t.is_contiguous()):
        return t
    return t.detach().to(dtype).contiguous()


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
    both ``None``; ``momentum=None`` (cumulative average) needs ``num_batches_tracked``, a
    one-element int64 CPU tensor advanced by one. Returns ``(y, stats, finite)``: ``stats`` is a
    float64 tensor of ``2 * C`` values, the batch mean then ``1/sqrt(var + eps)``; for a
    non-finite batch nothing is updated and ``finite`` is False (the caller warns or raises).
    """
    x_in = x
    x, a, c, b, threads = _prepare(x)
    dt = x.dtype
    if weight is not None and (weight.dtype is not dt or not weight.is_contiguous()):
        weight = weight.detach().to(dt).contiguous()
    if bias is not None and (bias.dtype is not dt or not bias.is_contiguous()):
        bias = bias.detach().to(dt).contiguous()
    y = buffers.empty_like(x)
    stats = buffers.empty(2 * c, _F64)  # as large as x on very wide inputs
    if running_mean is None:
        flags = 0
        prm = prv = pnbt = 0
    else:
        flags = 4
        prm, prv = running_mean.data_ptr(), running_var.data_ptr()
        pnbt = 0
        if num_batches_tracked is not None:
            nbt = num_batches_tracked
            if not (nbt.dtype is torch.int64 and nbt.is_cpu and nbt.numel() == 1):
                raise TypeError(
                    f"num_batches_tracked must be a one-element int64 CPU tensor, got "
                    f"{nbt.dtype} of shape {tuple(nbt.shape)} on {nbt.device}"
                )
            flags = 12
            pnbt = nbt.data_ptr()
    if momentum is None:
        flags |= 16
        momentum = 0.0
    if weight is not None:
        flags |= 1
    if bias is not None:
        flags |= 2
    finite = (loops.train_forward_f32 if dt is _F32 else loops.train_forward_f64)(
        x.data_ptr(), y.data_ptr(), a, c, b,
        0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
        prm, prv, pnbt, flags, float(momentum), float(eps), stats.data_ptr(), threads,
        RUN_BLOCK_BYTES, _pool(dt),
    )  # fmt: skip
    if y.dtype is not x_in.dtype:
        y = y.to(x_in.dtype)
    return y, stats, finite


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``: one fused pass."""
    x_in = x
    x, a, c, b, threads = _prepare(x)
    dt = x.dtype
    rm = _checked_per_channel(running_mean, dt)
    rv = _checked_per_channel(running_var, dt)
    flags = 0
    if weight is not None:
        flags = 1
        if weight.dtype is not dt or not weight.is_contiguous():
            weight = weight.detach().to(dt).contiguous()
    if bias is not None:
        flags |= 2
        if bias.dtype is not dt or not bias.is_contiguous():
            bias = bias.detach().to(dt).contiguous()
    y = buffers.empty_like(x)
    (loops.eval_forward_f32 if dt is _F32 else loops.eval_forward_f64)(
        x.data_ptr(), y.data_ptr(), a, c, b, rm.data_ptr(), rv.data_ptr(),
        0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
        flags, float(eps), threads, _pool(dt),
    )  # fmt: skip
    return y if y.dtype is x_in.dtype else y.to(x_in.dtype)


def eval_forward_checked(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """:func:`eval_forward` for a caller that has checked the per-channel tensors: CPU, dense,
    of x's dtype, float32 or float64 (the layers' fast path; the fewer Python steps matter on
    small inputs)."""
    if x.is_contiguous():
        shape = x.shape
        a = shape[0]
        c = shape[1]
        n = x.numel()
        b = n // (a * c)
    else:
        x, a, c, b, _ = _prepare(x)
        n = x.numel()
    y = buffers.empty_like(x)
    flags = 0
    if weight is not None:
        flags = 1
    if bias is not None:
        flags |= 2
    dt = x.dtype
    (loops.eval_forward_f32 if dt is _F32 else loops.eval_forward_f64)(
        x.data_ptr(), y.data_ptr(), a, c, b, running_mean.data_ptr(), running_var.data_ptr(),
        0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
        flags, eps, _threads(n), _pool(dt),
    )  # fmt: skip
    return y


def _format(x: Tensor) -> torch.memory_format:
    """The memory format of a tensor in a layout the loops take."""
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _grad_like(dy: Tensor, x: Tensor) -> Tensor:
    """The incoming gradient in x's dtype and layout (autograd may hand over any strides)."""
    if dy.dtype is not x.dtype:
        dy = dy.to(x.dtype)
    if x.is_contiguous():
        return dy if dy.is_contiguous() else dy.contiguous()
    return _like(dy, x, x.dtype)


def _param_grads(
    need_w: bool, need_b: bool, c: int, dt: torch.dtype
) -> tuple[Tensor | None, Tensor | None]:
    return (
        buffers.empty(c, dt) if need_w else None,
        buffers.empty(c, dt) if need_b else None,
    )


def _in_dtype(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    return t if t is None or like is None or t.dtype is like.dtype else t.to(like.dtype)


def train_backward(
    dy: Tensor,
    x: Tensor,
    stats: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of training-mode batch norm in one compiled call: ``(dx, dweight, dbias)``
    (``None`` where ``needs`` says it is not wanted: its first three entries are for x, weight
    and bias), each in its tensor's dtype.

    ``stats`` is :func:`train_forward`'s mean and invstd (float64, ``2 * C`` values).
    ``dweight = sum(dy * (x - mean)) * invstd`` and ``dbias = sum(dy)``; ``dx`` as in
    :func:`backward_elementwise` with ``count`` = the values per channel of ``x``.
    """
    _same_shape(dy, x)
    x_in = x
    x, a, c, b, threads = _prepare(x)
    dt = x.dtype
    if dy.dtype is not dt or not dy.is_contiguous(memory_format=_format(x)):
        dy = _grad_like(dy, x)
    flags = 0
    w = weight
    if w is not None:
        flags = 1
        if w.dtype is not dt or not w.is_contiguous():
            w = w.detach().to(dt).contiguous()
    dx = dw = db = None
    if needs[0]:
        flags |= 8
        dx = buffers.empty_like(x)
    if needs[1] and weight is not None:
        flags |= 2
        dw = buffers.empty(c, dt)
    if needs[2] and bias is not None:
        flags |= 4
        db = buffers.empty(c, dt)
    (loops.train_backward_f32 if dt is _F32 else loops.train_backward_f64)(
        dy.data_ptr(), x.data_ptr(), a, c, b, stats.data_ptr(),
        0 if w is None else w.data_ptr(), flags, 0 if dx is None else dx.data_ptr(),
        0 if dw is None else dw.data_ptr(), 0 if db is None else db.data_ptr(), threads,
        RUN_BLOCK_BYTES, _pool(dt),
    )  # fmt: skip
    if dx is not None and dx.dtype is not x_in.dtype:
        dx = dx.to(x_in.dtype)
    return dx, _in_dtype(dw, weight), _in_dtype(db, bias)


def eval_backward(
    dy: Tensor,
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of evaluation-mode batch norm (the running statistics are constants):
    ``dx = dy * weight / sqrt(running_var + eps)``, ``dweight = sum(dy * x_hat)``,
    ``dbias = sum(dy)``, in one compiled call."""
    need_x = needs[0]
    need_w = needs[1] and weight is not None
    need_b = needs[2] and bias is not None
    _same_shape(dy, x)
    x_in = x
    x, a, c, b, threads = _prepare(x)
    dt = x.dtype
    dy = _grad_like(dy, x)
    rm = _checked_per_channel(running_mean, dt)
    rv = _checked_per_channel(running_var, dt)
    w = _checked_per_channel(weight, dt)
    dx = buffers.empty_like(x) if need_x else None
    dw, db = _param_grads(need_w, need_b, c, dt)
    kernel = loops.eval_backward_f32 if dt is _F32 else loops.eval_backward_f64
    kernel(
        dy.data_ptr(), x.data_ptr(), a, c, b, rm.data_ptr(), rv.data_ptr(),
        0 if w is None else w.data_ptr(), (w is not None) | need_w << 1 | need_b << 2 | need_x << 3,
        float(eps), 0 if dx is None else dx.data_ptr(), 0 if dw is None else dw.data_ptr(),
        0 if db is None else db.data_ptr(), threads, _pool(dt),
    )  # fmt: skip
    if dx is not None and dx.dtype is not x_in.dtype:
        dx = dx.to(x_in.dtype)
    return dx, _in_dtype(dw, weight), _in_dtype(db, bias)


def update_from_batch(
    mean: Tensor,
    invstd: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    count: int,
    max_ratio: float,
) -> int:
    """Move the running statistics towards a batch whose mean and ``1/sqrt(var + eps)`` another
    kernel computed (dense (C,) tensors of the buffers' dtype), in one compiled call.

    Returns 0 when done; 1 when the batch is non-finite and 2 when a channel's
    ``|mean| * invstd`` exceeds ``max_ratio``, in both cases changing nothing. The update is
    :func:`bnorm.functional.update_running_stats`'s, with the variance recovered as
    ``1/invstd^2 - eps``.
    """
    flags = 0
    prm = prv = pnbt = 0
    if running_mean is not None:
        flags = 1
        prm, prv = running_mean.data_ptr(), running_var.data_ptr()
        if num_batches_tracked is not None:
            flags = 3
            pnbt = num_batches_tracked.data_ptr()
    if momentum is None:
        flags |= 4
        momentum = 0.0
    kernel = loops.update_from_batch_f32 if mean.dtype is _F32 else loops.update_from_batch_f64
    return kernel(
        mean.data_ptr(), invstd.data_ptr(), mean.shape[0], prm, prv, pnbt, flags,
        float(momentum), float(eps), count, float(max_ratio),
    )  # fmt: skip
