"""The compiled loops behind :mod:`bnorm.kernels.numba_cpu` (numba, multi-threaded, cached).

Every loop sees its tensor as a C-contiguous 3D array ``(A, C, B)``:

- ``B > 1``: contiguous (N, C, \\*) data, ``A = N`` and ``B`` = the spatial size; a row
  ``x[a, c, :]`` is one channel's contiguous run, so the threads split the ``A * C`` rows;
- ``B == 1``: the channel is the innermost dimension ((N, C) contiguous, or channels_last data
  permuted to (N, \\*, C)), ``A`` = every position; the threads split the ``A`` positions into
  chunks and each chunk walks all channels in its inner loop (contiguous, vectorizable).

One compiled function serves both shapes, so each kernel compiles once per dtype (float32 and
float64), lazily, on first use; ``cache=True`` keeps the machine code on disk for later
processes. Small tensors run with ``nchunks == 1`` on a pool of one thread.

Accumulation: sums are of ``x - k`` (``k`` one value per channel, near the data) in float64,
per thread, and merged by adding the per-thread partial sums: with a common shift no
correction term is needed (unlike merging means and variances), and float64 keeps the rounding
far below float32's resolution.
The elementwise loops compute in the data's dtype around the same kind of shift, so the large
part of ``x - mean`` is subtracted exactly (Sterbenz) even when the mean is 1e5 standard
deviations from zero.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Reassociation lets LLVM vectorize the reductions; NaN/Inf must still propagate (the running
# statistics' non-finite guard relies on it), so the no-NaN/no-Inf flags stay off.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_OPTS = {"cache": True, "nogil": True, "fastmath": _FASTMATH}


@njit(**_OPTS)
def _sums_rows(x, k, m0, m1, s1, s2):  # pragma: no cover - compiled
    # channel-innermost rows [m0, m1): s1[c] += x - k, s2[c] += (x - k)^2
    C = x.shape[1]
    for m in range(m0, m1):
        for c in range(C):
            d = np.float64(x[m, c]) - k[c]
            s1[c] += d
            s2[c] += d * d


@njit(**_OPTS)
def _sums_run(x, a, c, k):  # pragma: no cover - compiled
    # one contiguous run x[a, c, :] around k[c]
    kc = k[c]
    t1 = 0.0
    t2 = 0.0
    for i in range(x.shape[2]):
        d = np.float64(x[a, c, i]) - kc
        t1 += d
        t2 += d * d
    return t1, t2


@njit(**_OPTS)
def _merge(p1, p2):  # pragma: no cover - compiled
    # add the per-thread (or per-row) partial sums: same shift, so a plain sum merges them
    n, C = p1.shape
    s1 = np.zeros(C)
    s2 = np.zeros(C)
    for t in range(n):
        for c in range(C):
            s1[c] += p1[t, c]
            s2[c] += p2[t, c]
    return s1, s2


@njit(inline="always", **_OPTS)
def _shifted_sums(x, k, nchunks):  # pragma: no cover - compiled
    """Per-channel ``(sum(x - k), sum((x - k)^2))`` in float64; ``k`` is float64 (C,)."""
    A, C, B = x.shape
    if B == 1:
        x2 = x.reshape(A, C)  # 2D: the channel loop has unit stride
        p1 = np.empty((nchunks, C))
        p2 = np.empty((nchunks, C))
        for t in prange(nchunks):
            for c in range(C):
                p1[t, c] = 0.0
                p2[t, c] = 0.0
            _sums_rows(x2, k, A * t // nchunks, A * (t + 1) // nchunks, p1[t], p2[t])
        return _merge(p1, p2)
    r1 = np.empty((A, C))
    r2 = np.empty((A, C))
    for r in prange(A * C):
        a = r // C
        c = r - a * C
        t1, t2 = _sums_run(x, a, c, k)
        r1[a, c] = t1
        r2[a, c] = t2
    return _merge(r1, r2)


@njit(**_OPTS)
def _dot_rows(dy, x, k, m0, m1, s1, s2):  # pragma: no cover - compiled
    C = x.shape[1]
    for m in range(m0, m1):
        for c in range(C):
            g = np.float64(dy[m, c])
            s1[c] += g
            s2[c] += g * (np.float64(x[m, c]) - k[c])


@njit(**_OPTS)
def _dot_run(dy, x, a, c, k):  # pragma: no cover - compiled
    kc = k[c]
    t1 = 0.0
    t2 = 0.0
    for i in range(x.shape[2]):
        g = np.float64(dy[a, c, i])
        t1 += g
        t2 += g * (np.float64(x[a, c, i]) - kc)
    return t1, t2


@njit(inline="always", **_OPTS)
def _grad_sums(dy, x, k, nchunks):  # pragma: no cover - compiled
    """Per-channel ``(sum(dy), sum(dy * (x - k)))`` in float64; ``k`` is float64 (C,)."""
    A, C, B = x.shape
    if B == 1:
        x2 = x.reshape(A, C)
        dy2 = dy.reshape(A, C)
        p1 = np.empty((nchunks, C))
        p2 = np.empty((nchunks, C))
        for t in prange(nchunks):
            for c in range(C):
                p1[t, c] = 0.0
                p2[t, c] = 0.0
            _dot_rows(dy2, x2, k, A * t // nchunks, A * (t + 1) // nchunks, p1[t], p2[t])
        return _merge(p1, p2)
    r1 = np.empty((A, C))
    r2 = np.empty((A, C))
    for r in prange(A * C):
        a = r // C
        c = r - a * C
        t1, t2 = _dot_run(dy, x, a, c, k)
        r1[a, c] = t1
        r2[a, c] = t2
    return _merge(r1, r2)


@njit(**_OPTS)
def _affine_rows(x, k, s, o, y, m0, m1):  # pragma: no cover - compiled
    C = x.shape[1]
    for m in range(m0, m1):
        for c in range(C):
            y[m, c] = (x[m, c] - k[c]) * s[c] + o[c]


@njit(**_OPTS)
def _affine_run(x, k, s, o, y, a, c):  # pragma: no cover - compiled
    kc = k[c]
    sc = s[c]
    oc = o[c]
    for i in range(x.shape[2]):
        y[a, c, i] = (x[a, c, i] - kc) * sc + oc


@njit(inline="always", **_OPTS)
def _shifted_affine(x, k, s, o, y, nchunks):  # pragma: no cover - compiled
    """``y = (x - k) * s + o`` per channel, in x's dtype (k, s, o of x's dtype, shape (C,))."""
    A, C, B = x.shape
    if B == 1:
        x2 = x.reshape(A, C)
        y2 = y.reshape(A, C)
        for t in prange(nchunks):
            _affine_rows(x2, k, s, o, y2, A * t // nchunks, A * (t + 1) // nchunks)
    else:
        for r in prange(A * C):
            a = r // C
            _affine_run(x, k, s, o, y, a, r - a * C)


@njit(**_OPTS)
def _grad_rows(dy, x, k, ga, gb, gc, dx, m0, m1):  # pragma: no cover - compiled
    C = x.shape[1]
    for m in range(m0, m1):
        for c in range(C):
            dx[m, c] = ga[c] * dy[m, c] + gb[c] * (x[m, c] - k[c]) + gc[c]


@njit(**_OPTS)
def _grad_run(dy, x, k, ga, gb, gc, dx, a, c):  # pragma: no cover - compiled
    kc = k[c]
    ac = ga[c]
    bc = gb[c]
    cc = gc[c]
    for i in range(x.shape[2]):
        dx[a, c, i] = ac * dy[a, c, i] + bc * (x[a, c, i] - kc) + cc


@njit(inline="always", **_OPTS)
def _input_grad(dy, x, k, ga, gb, gc, dx, nchunks):  # pragma: no cover - compiled
    """``dx = ga * dy + gb * (x - k) + gc`` per channel, in x's dtype."""
    A, C, B = x.shape
    if B == 1:
        x2 = x.reshape(A, C)
        dy2 = dy.reshape(A, C)
        dx2 = dx.reshape(A, C)
        for t in prange(nchunks):
            _grad_rows(dy2, x2, k, ga, gb, gc, dx2, A * t // nchunks, A * (t + 1) // nchunks)
    else:
        for r in prange(A * C):
            a = r // C
            _grad_run(dy, x, k, ga, gb, gc, dx, a, r - a * C)


@njit(parallel=True, **_OPTS)
def start_pool(n):  # pragma: no cover - compiled
    """A trivial parallel loop: its first launch starts numba's thread pool."""
    out = np.empty(n)
    for i in prange(n):
        out[i] = i
    return out


# --- entry points ------------------------------------------------------------------------------
# The parallel loops above are inlined (``inline="always"``) into each entry point, so no
# cached function calls another parallel one: numba can segfault when a cached caller loads
# a parallel callee from its cache (numba issues #4807, #8578).


@njit(parallel=True, **_OPTS)
def shifted_sums(x, k, nchunks):  # pragma: no cover - compiled
    """Per-channel ``(sum(x - k), sum((x - k)^2))`` in float64; ``k`` is float64 (C,)."""
    return _shifted_sums(x, k, nchunks)


@njit(parallel=True, **_OPTS)
def grad_sums(dy, x, k, nchunks):  # pragma: no cover - compiled
    """Per-channel ``(sum(dy), sum(dy * (x - k)))`` in float64; ``k`` is float64 (C,)."""
    return _grad_sums(dy, x, k, nchunks)


@njit(parallel=True, **_OPTS)
def shifted_affine(x, k, s, o, y, nchunks):  # pragma: no cover - compiled
    """``y = (x - k) * s + o`` per channel, in x's dtype (k, s, o of x's dtype, shape (C,))."""
    _shifted_affine(x, k, s, o, y, nchunks)


@njit(parallel=True, **_OPTS)
def input_grad(dy, x, k, ga, gb, gc, dx, nchunks):  # pragma: no cover - compiled
    """``dx = ga * dy + gb * (x - k) + gc`` per channel, in x's dtype."""
    _input_grad(dy, x, k, ga, gb, gc, dx, nchunks)


# --- fused steps: one call per forward or backward, per-channel math included ----------------
# Optional per-channel arrays (weight, bias, running statistics, the batch counter) come as
# length-0 arrays when absent: one compiled signature serves every combination.


@njit(parallel=True, **_OPTS)
def train_forward(x, w, b, rm, rv, nbt, momentum, cumulative, eps, y, nchunks):  # pragma: no cover
    """Batch statistics, the running-statistics update and ``y``, in one call.

    Returns ``(mean, invstd, finite)`` (float64, float64, bool). ``cumulative`` is PyTorch's
    ``momentum=None``: the rate is ``1 / (nbt + 1)``. A non-finite batch leaves ``rm``, ``rv`` and
    ``nbt`` untouched (the caller warns or raises) and still produces ``y``.
    """
    A, C, B = x.shape
    n = A * B
    k = np.empty(C)
    for c in range(C):
        k[c] = x[0, c, 0]
    s1, s2 = _shifted_sums(x, k, nchunks)
    mean = np.empty(C)
    var = np.empty(C)
    finite = True
    for c in range(C):
        d = s1[c] / n
        mean[c] = k[c] + d
        var[c] = max(s2[c] / n - d * d, 0.0)
        if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            finite = False
    if finite and rm.size > 0:
        rate = 1.0 / (nbt[0] + 1) if cumulative and nbt.size > 0 else momentum
        unbias = n / (n - 1)
        for c in range(C):
            rm[c] = (1.0 - rate) * np.float64(rm[c]) + rate * mean[c]
            rv[c] = (1.0 - rate) * np.float64(rv[c]) + rate * var[c] * unbias
        if nbt.size > 0:
            nbt[0] += 1
    invstd = np.empty(C)
    for c in range(C):
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
    _affine_from_stats(x, mean, invstd, w, b, y, nchunks)
    return mean, invstd, finite


@njit(**_OPTS)
def _coefficients(x, mean, invstd, w, b):  # pragma: no cover - compiled
    # y = (x - k) * s + o with k = mean in x's dtype: the large part of x - mean is exact
    C = x.shape[1]
    k = np.empty(C, x.dtype)
    s = np.empty(C, x.dtype)
    o = np.empty(C, x.dtype)
    for c in range(C):
        k[c] = mean[c]
        scale = invstd[c] * (np.float64(w[c]) if w.size > 0 else 1.0)
        s[c] = scale
        o[c] = (np.float64(b[c]) if b.size > 0 else 0.0) - (mean[c] - np.float64(k[c])) * scale
    return k, s, o


@njit(inline="always", **_OPTS)
def _affine_from_stats(x, mean, invstd, w, b, y, nchunks):  # pragma: no cover - compiled
    k, s, o = _coefficients(x, mean, invstd, w, b)
    _shifted_affine(x, k, s, o, y, nchunks)


@njit(parallel=True, **_OPTS)
def eval_forward(x, rm, rv, w, b, eps, y, nchunks):  # pragma: no cover - compiled
    """``y = (x - rm) / sqrt(rv + eps) * w + b`` in one call (evaluation mode)."""
    C = x.shape[1]
    mean = np.empty(C)
    invstd = np.empty(C)
    for c in range(C):
        mean[c] = rm[c]
        invstd[c] = 1.0 / np.sqrt(np.float64(rv[c]) + eps)
    _affine_from_stats(x, mean, invstd, w, b, y, nchunks)


@njit(parallel=True, **_OPTS)
def train_backward(dy, x, mean, invstd, w, dx, nchunks):  # pragma: no cover - compiled
    """Both backward reductions and (if ``dx.size``) the input gradient, in one call.

    Returns ``(sum_dy, sum_dy_xmu)`` in float64.
    """
    A, C, B = x.shape
    n = A * B
    sum_dy, sum_dy_xmu = _grad_sums(dy, x, mean, nchunks)
    if dx.size > 0:
        k = np.empty(C, x.dtype)
        ga = np.empty(C, x.dtype)
        gb = np.empty(C, x.dtype)
        gc = np.empty(C, x.dtype)
        for c in range(C):
            k[c] = mean[c]
            a = (np.float64(w[c]) if w.size > 0 else 1.0) * invstd[c]
            bb = -a * invstd[c] * invstd[c] * sum_dy_xmu[c] / n
            ga[c] = a
            gb[c] = bb
            gc[c] = -a * sum_dy[c] / n - bb * (mean[c] - np.float64(k[c]))
        _input_grad(dy, x, k, ga, gb, gc, dx, nchunks)
    return sum_dy, sum_dy_xmu
