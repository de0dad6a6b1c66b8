r"""The compiled loops behind :mod:`bnorm.kernels.numba_cpu` (numba: multi-threaded, cached).

**Calling convention.** Every entry point takes raw addresses (``int``) and sizes, never NumPy
arrays: turning a torch tensor into an array costs about a microsecond per tensor and numba's
dispatch types each array argument, while ``tensor.data_ptr()`` and integer arguments cost a
tenth of that. The entry point rebuilds typed arrays from the addresses (``carray``), so a
kernel call costs well under two microseconds in Python. The caller guarantees that each
address points at a live, dense buffer of the stated size and dtype; per-channel arguments may
be 0 (absent) where the docstring says so. Entry points come in pairs, ``*_f32`` and ``*_f64``,
for float32 and float64 data; per-channel parameters of the fused kernels have the data's
dtype, while statistics, sums and the arguments of the four-step kernels are float64.

**Shapes.** The data is seen as ``(A, C, B)``: contiguous ``(N, C, *)`` data has ``A = N`` and
``B`` = the spatial size; channels_last data (and ``(N, C)``) has ``A`` = every position and
``B = 1``. Two loop families cover them:

- *columns*, when the channel index varies fast (``B == 1``, or a spatial run shorter than
  ``RUN_MIN``): the flat data is cut into rows of ``W = q * C * B`` values (``q`` whole
  samples, enough for ``W >= 64`` and, on large batches, a multiple of 16), so every row holds
  the same sequence of channels; per-channel coefficients are expanded to one per column and
  the inner loop over ``W`` is plain, unit-stride and vectorized. Threads split the rows. The
  few samples that do not fill a row (the *tail*) are done one value at a time.
- *runs*, for contiguous data with spatial runs of ``RUN_MIN`` values or more: each
  ``x[a, c, :]`` is one channel's contiguous run; threads split the ``A * C`` runs.

*Channel blocks*: the training forward and backward of runs-family data with a few channels
per thread fuse their two passes per block of channels that fits in a core's cache (see
:func:`channel_block`), so the second read of x (and dy) comes from cache, not memory, where
the caller gives them a budget (``run_bytes``: on Intel processors; on AMD's the two-pass loops
were faster, see ``numba_cpu.RUN_BLOCK_BYTES``). Short
runs in a small batch (at most ``WIDE_MAX_SAMPLES`` samples: many channels, few values each)
take *wide* blocks, in evaluation too: the rows of the column family would be few and their
per-column arrays as large as the data, while a block's segment of each sample is contiguous
and its per-channel work stays in cache.

**Statistics** are sums of ``x - k``, ``k`` a per-channel shift close to the data (the mean of
the channel's first values). Blocks of a few thousand values are summed in the data's dtype
(16 float32 lanes: as fast as memory delivers them) and each block's sums are added in
float64; the threads' float64 sums are then added (one shift for everybody: no correction
term). Rounding in a block grows with ``(mean - k)^2``, so when the result shows that the
shift was more than 3 standard deviations from the mean, the sums are taken again around the
mean (one more read, rare). A mean 1e5 standard deviations away from zero costs no precision.
**Elementwise** loops compute in the data's dtype around ``k`` = the mean rounded to that dtype,
so the large part of ``x - mean`` is subtracted exactly (Sterbenz) before anything is rounded;
with short runs, a channel whose mean is within ``DIRECT_MAX`` standard deviations of zero,
where there is nothing to cancel, takes ``k = 0`` (one coefficient array fewer to read).

**Threads.** ``nthreads == 1`` runs the serial branch (no parallel region is launched: that
costs a microsecond, more than a small tensor takes); otherwise the work is cut into
``nthreads`` contiguous chunks, one per thread of torch's OpenMP pool (see "torch's OpenMP
thread pool" below) or, where that pool cannot be used, of numba's, whose size the caller sets
(``numba.set_num_threads`` inside compiled code would make it uncacheable).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, literal_unroll, njit, prange, types
from numba.extending import intrinsic

# Reassociation lets LLVM vectorize the reductions; NaN/Inf must still propagate (the running
# statistics' non-finite guard relies on it), so the no-NaN/no-Inf flags stay off. NumPy's
# error model: a float division by zero gives Inf/NaN instead of Python's ZeroDivisionError,
# whose check kept every loop with a division scalar (measured: 1/sqrt(var + eps) over 131072
# channels 508 -> 254 us); no division here has a zero divisor.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_OPTS = {"cache": True, "nogil": True, "fastmath": _FASTMATH, "error_model": "numpy"}
# Parallel loops are inlined into each entry point (``inline="always"``) so that no cached
# function calls another parallel one: numba can crash when a cached caller loads a parallel
# callee from its cache (numba issues #4807, #8578).
_INLINE = {"inline": "always", **_OPTS}
_PARALLEL = {"parallel": True, **_OPTS}
# A literal argument (``f(x, 0)``) is typed Literal[int](0), and numba compiles the callee
# once more for it; the blocked passes take their channel range as int64 from every caller
# (a NumPy scalar global is typed int64), so each compiles once (measured: the first float32
# training step and evaluation compile in about 6 s less, of 70-80)
_ZERO = np.int64(0)

#: spatial runs at least this long are processed run by run (the runs family); shorter ones,
#: and B == 1, by the column family (measured: runs win from 32 values on, by up to 5x on
#: small batches, where columns spend as much on their expanded coefficients as on the data)
RUN_MIN = 32
#: the column family's rows hold at least this many values (q whole samples)
ROW_MIN = 64


def _pointer(nbtype):
    """An intrinsic that turns an integer address into a typed pointer (for ``carray``)."""

    @intrinsic
    def cast(typingctx, address):
        ptr = types.CPointer(nbtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(address), codegen

    return cast


@intrinsic
def _typed(typingctx, address, zero):
    """The integer ``address`` as a pointer to values of ``zero``'s type (for ``carray``): one
    generic function then serves float32 and float64 data, specialized by the zero it gets."""
    ptr = types.CPointer(zero)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, zero), codegen


_f32 = _pointer(types.float32)
_f64 = _pointer(types.float64)
_i64 = _pointer(types.int64)
_u8 = _pointer(types.uint8)


# --- torch's OpenMP thread pool ------------------------------------------------------------------
# numba's parallel loops (prange) run on numba's own OpenMP runtime: a second pool of threads
# beside the one torch's kernels use (numba links the system's libgomp, torch's wheels ship
# their own). Each launch on it costs 2-4 microseconds, and right after a torch operation its
# threads must wake while torch's still spin. Where torch runs on GNU OpenMP, the loops instead
# run on torch's pool: GOMP_parallel(fn, data, nthreads, 0) is the call a compiler emits for
# `#pragma omp parallel`, made here through the addresses of torch's runtime's functions
# (found by numba_cpu) with a compiled C callback (a *share*) that does the parts of the work
# given to its thread. The runtime may give a region fewer threads than asked for (with
# OMP_DYNAMIC=true, OMP_THREAD_LIMIT, or inside another parallel region), so a share does not
# assume one thread per part: thread ``i`` of a team of ``n`` does parts i, i + n, ... .
#
# Every parallel entry point takes ``pomp``: 0 for numba's pool, or the address of an int64
# table [GOMP_parallel, omp_get_thread_num, omp_get_num_threads, sums share, dots share,
# affine share, grad share, blocked forward share, blocked backward share, blocked evaluation
# share, GOMP_barrier] for the data's dtype
# (see :func:`shares`). A share reads its arguments from an int64 block of addresses and sizes;
# the arrays behind those addresses are kept alive past the parallel region (``_alive``), since
# numba frees an array after its last use in the code.


@intrinsic
def _omp_parallel(typingctx, address, fn, data, nthreads):
    """``GOMP_parallel(fn, data, nthreads, 0)`` through the function's address: ``fn(data)``
    runs once on each of ``nthreads`` threads of the pool, the calling thread included."""

    def codegen(context, builder, signature, args):
        byte_ptr = ir.IntType(8).as_pointer()
        u32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, byte_ptr, u32, u32])
        builder.call(
            builder.inttoptr(args[0], fnty.as_pointer()),
            [
                builder.inttoptr(args[1], byte_ptr),
                builder.inttoptr(args[2], byte_ptr),
                builder.trunc(args[3], u32),
                ir.Constant(u32, 0),
            ],
        )
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def _omp_int(typingctx, address):
    """An ``int f(void)`` of the OpenMP runtime through its address: ``omp_get_thread_num()``
    (this thread's number in its team, 0 for the thread that launched the region) or
    ``omp_get_num_threads()`` (the team's size)."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        result = builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])
        return builder.sext(result, ir.IntType(64))

    return types.int64(types.int64), codegen


@intrinsic
def _omp_barrier(typingctx, address):
    """``GOMP_barrier()`` through its address (``#pragma omp barrier``): a thread of a team
    waits here until every thread of the team has arrived, and sees what they wrote before."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@njit(**_OPTS)
def _table(pomp):
    """The table at ``pomp`` (eleven int64), or an empty one for numba's pool (``pomp == 0``)."""
    return carray(_i64(pomp), 11 if pomp != 0 else 0)


@njit(**_OPTS)
def _alive(arrays):
    """A use, after a parallel region, of the arrays its callbacks read through their addresses
    (a tuple): they stay alive until here."""
    n = 0
    for a in literal_unroll(arrays):
        n += a.size
    return n


@njit(**_OPTS)
def _block(values):
    """A share's argument block: an int64 array of ``values``, a tuple of integers (addresses
    and sizes; numba types the addresses unsigned, hence the unrolled loop)."""
    blk = np.empty(len(values), np.int64)
    i = 0
    for v in literal_unroll(values):
        blk[i] = v
        i += 1
    return blk


# the shares' argument blocks (int64 slots, as many as the _block tuples that make them hold;
# the first and the last hold the addresses of omp_get_thread_num and omp_get_num_threads)
_SUMS_BLOCK = 18  # tid, g, x, A, C, B, W, rows, k, kcol, nthreads, p1, p2, P, o1, o2, len(o1), n
_AFFINE_BLOCK = 16  # tid, x, y, A, C, B, W, rows, k, s, o, kc, sc, oc, nthreads, n
_GRAD_BLOCK = 13  # tid, g, x, d, A, C, B, W, rows, co, cols, nthreads, n
# tid, x, y, A, C, B, cb, w, b, flags, (eps, rate), stats, fin, nthreads, n, rm, rv, barrier
_FORWARD_BLOCKS_BLOCK = 18
# tid, g, x, d, A, C, B, cb, stats, w, flags, dw, db, nthreads, n
_BACKWARD_BLOCKS_BLOCK = 15
# tid, x, y, A, C, B, cb, rm, rv, w, b, flags, eps, nthreads, n
_EVAL_BLOCKS_BLOCK = 15


@njit(**_OPTS)
def _sums_block(g1, x1, A, C, B, W, rows, k, kcol, nthreads, p1, p2, o1, o2, omp):
    blk = _block((  # _SUMS_BLOCK slots
        omp[1], g1.ctypes.data, x1.ctypes.data, A, C, B, W, rows, k.ctypes.data, kcol.ctypes.data,
        nthreads, p1.ctypes.data, p2.ctypes.data, p1.shape[1], o1.ctypes.data, o2.ctypes.data,
        o1.shape[0], omp[2],
    ))  # fmt: skip
    return blk


# Each share is a C callback of one dtype; its body is a generic compiled function that the
# dtype's zero (``np.float32(0)`` or ``np.float64(0)``) specializes, through _typed: one source
# per share, and only the dtype in use compiles.


@njit(**_OPTS)
def _sums_from(data, zero, dots):
    """The sums share (``dots``: the backward sums) on the block at ``data``."""
    blk = carray(_i64(data), _SUMS_BLOCK)
    A, C, B, W, nt, P, no = blk[3], blk[4], blk[5], blk[6], blk[10], blk[13], blk[16]
    n = A * C * B
    g1 = carray(_typed(blk[1], zero), n)
    x1 = carray(_typed(blk[2], zero), n)
    k = carray(_typed(blk[8], zero), C)
    kcol = carray(_typed(blk[9], zero), max(W, 0))  # (W < 0: wide blocks, no columns)
    p1 = carray(_f64(blk[11]), (nt, P))
    p2 = carray(_f64(blk[12]), (nt, P))
    o1 = carray(_f64(blk[14]), no)
    o2 = carray(_f64(blk[15]), no)
    t, team = _omp_int(blk[0]), _omp_int(blk[17])
    while t < nt:
        if dots:
            _dots_part(g1, x1, A, C, B, W, blk[7], k, kcol, t, nt, p1, p2, o1, o2)
        else:
            _sums_part(x1, A, C, B, W, blk[7], k, kcol, t, nt, p1, p2, o1, o2)
        t += team


@njit(**_OPTS)
def _affine_from(data, zero):
    blk = carray(_i64(data), _AFFINE_BLOCK)
    A, C, B, W, nt = blk[3], blk[4], blk[5], blk[6], blk[14]
    n = A * C * B
    x1 = carray(_typed(blk[1], zero), n)
    y1 = carray(_typed(blk[2], zero), n)
    k = carray(_typed(blk[8], zero), C)
    s = carray(_typed(blk[9], zero), C)
    o = carray(_typed(blk[10], zero), C)
    kc = carray(_typed(blk[11], zero), max(W, 0))  # (W < 0: wide blocks, no columns)
    sc = carray(_typed(blk[12], zero), max(W, 0))
    oc = carray(_typed(blk[13], zero), max(W, 0))
    t, team = _omp_int(blk[0]), _omp_int(blk[15])
    while t < nt:
        _affine_part(x1, y1, A, C, B, W, blk[7], k, s, o, kc, sc, oc, t, nt)
        t += team


@njit(**_OPTS)
def _grad_from(data, zero):
    blk = carray(_i64(data), _GRAD_BLOCK)
    A, C, B, W, nt = blk[4], blk[5], blk[6], blk[7], blk[11]
    n = A * C * B
    g1 = carray(_typed(blk[1], zero), n)
    x1 = carray(_typed(blk[2], zero), n)
    d1 = carray(_typed(blk[3], zero), n)
    co = carray(_typed(blk[9], zero), (4, C))
    cols = carray(_typed(blk[10], zero), (4, max(W, 0)))  # (W < 0: wide blocks)
    t, team = _omp_int(blk[0]), _omp_int(blk[12])
    while t < nt:
        _grad_part(g1, x1, d1, A, C, B, W, blk[8], co, cols, t, nt)
        t += team


@njit(**_OPTS)
def _forward_blocks_from(data, zero):
    blk = carray(_i64(data), _FORWARD_BLOCKS_BLOCK)
    A, C, B, cb, flags, nt = blk[3], blk[4], blk[5], blk[6], blk[9], blk[13]
    n = A * C * B
    x1 = carray(_typed(blk[1], zero), n)
    y1 = carray(_typed(blk[2], zero), n)
    w = carray(_typed(blk[7], zero), C)
    b = carray(_typed(blk[8], zero), C)
    par = carray(_f64(blk[10]), 2)  # eps, the running statistics' rate
    stats = carray(_f64(blk[11]), (2, C))
    fin = carray(_u8(blk[12]), nt)
    rm = carray(_typed(blk[15], zero), C)
    rv = carray(_typed(blk[16], zero), C)
    has_w = (flags & 1) != 0
    has_b = (flags & 2) != 0
    tid, team = _omp_int(blk[0]), _omp_int(blk[14])
    t = tid
    while t < nt:
        lo, hi = _chunk(C, t, nt)  # threads split the channels
        fin[t] = _forward_blocks(x1, y1, A, C, B, cb, w, b, has_w, has_b, par[0], stats, lo, hi)
        t += team
    if blk[17] == 0:  # the caller finishes (few channels: cheaper than a barrier)
        return
    # every part's finite flag is needed before any running statistic may move
    _omp_barrier(blk[17])
    finite = _parts_finite(fin)
    t = tid
    while t < nt:
        lo, hi = _chunk(C, t, nt)
        _finish_forward(stats, rm, rv, flags, par[1], par[0], finite, A * B, x1, lo, hi)
        t += team


@njit(**_OPTS)
def _backward_blocks_from(data, zero):
    blk = carray(_i64(data), _BACKWARD_BLOCKS_BLOCK)
    A, C, B, cb, flags, nt = blk[4], blk[5], blk[6], blk[7], blk[10], blk[13]
    n = A * C * B
    g1 = carray(_typed(blk[1], zero), n)
    x1 = carray(_typed(blk[2], zero), n)
    d1 = carray(_typed(blk[3], zero), n)
    stats = carray(_f64(blk[8]), (2, C))
    w = carray(_typed(blk[9], zero), C)
    dw = carray(_typed(blk[11], zero), C)
    db = carray(_typed(blk[12], zero), C)
    t, team = _omp_int(blk[0]), _omp_int(blk[14])
    while t < nt:
        lo, hi = _chunk(C, t, nt)
        _backward_blocks(g1, x1, d1, A, C, B, cb, stats, w, (flags & 1) != 0, flags, dw, db, lo, hi)
        t += team


@njit(**_OPTS)
def _eval_blocks_from(data, zero):
    blk = carray(_i64(data), _EVAL_BLOCKS_BLOCK)
    A, C, B, cb, flags, nt = blk[3], blk[4], blk[5], blk[6], blk[11], blk[13]
    n = A * C * B
    x1 = carray(_typed(blk[1], zero), n)
    y1 = carray(_typed(blk[2], zero), n)
    rm = carray(_typed(blk[7], zero), C)
    rv = carray(_typed(blk[8], zero), C)
    w = carray(_typed(blk[9], zero), C)
    b = carray(_typed(blk[10], zero), C)
    eps = carray(_f64(blk[12]), 1)[0]
    t, team = _omp_int(blk[0]), _omp_int(blk[14])
    while t < nt:
        lo, hi = _chunk(C, t, nt)  # threads split the channels
        _eval_blocks(
            x1, y1, A, C, B, cb, rm, rv, w, b, (flags & 1) != 0, (flags & 2) != 0, eps, lo, hi
        )
        t += team


def _sums_share_f32(data):
    _sums_from(data, np.float32(0), False)


def _sums_share_f64(data):
    _sums_from(data, np.float64(0), False)


def _dots_share_f32(data):
    _sums_from(data, np.float32(0), True)


def _dots_share_f64(data):
    _sums_from(data, np.float64(0), True)


def _affine_share_f32(data):
    _affine_from(data, np.float32(0))


def _affine_share_f64(data):
    _affine_from(data, np.float64(0))


def _grad_share_f32(data):
    _grad_from(data, np.float32(0))


def _grad_share_f64(data):
    _grad_from(data, np.float64(0))


def _forward_blocks_share_f32(data):
    _forward_blocks_from(data, np.float32(0))


def _forward_blocks_share_f64(data):
    _forward_blocks_from(data, np.float64(0))


def _backward_blocks_share_f32(data):
    _backward_blocks_from(data, np.float32(0))


def _backward_blocks_share_f64(data):
    _backward_blocks_from(data, np.float64(0))


def _eval_blocks_share_f32(data):
    _eval_blocks_from(data, np.float32(0))


def _eval_blocks_share_f64(data):
    _eval_blocks_from(data, np.float64(0))


_SHARES = {
    True: (
        _sums_share_f32, _dots_share_f32, _affine_share_f32, _grad_share_f32,
        _forward_blocks_share_f32, _backward_blocks_share_f32, _eval_blocks_share_f32,
    ),
    False: (
        _sums_share_f64, _dots_share_f64, _affine_share_f64, _grad_share_f64,
        _forward_blocks_share_f64, _backward_blocks_share_f64, _eval_blocks_share_f64,
    ),
}  # fmt: skip


def shares(f32: bool) -> list[int]:
    """The addresses of the seven shares (sums, dots, affine, grad, blocked forward, blocked
    backward, blocked evaluation) for float32 (``f32``) or float64 data, compiled as C
    callbacks, or loaded from numba's cache, at the first call (a ``cfunc`` compiles when it is
    made: making them at import would slow every import)."""
    signature = types.void(types.intp)
    return [cfunc(signature, cache=True, fastmath=_FASTMATH)(f).address for f in _SHARES[f32]]


# --- layout ------------------------------------------------------------------------------------


@njit(**_OPTS)
def plan(A, C, B):
    """``(W, rows)`` of the column family (``W = 0`` selects the runs family).

    A row holds ``q`` whole samples: enough for ``W >= ROW_MIN`` and, where the batch has 16
    rows of them, a multiple of 16 values, so that every row is whole AVX-512 vectors (no
    scalar remainder).
    """
    cb = C * B
    if B < RUN_MIN:
        g = cb
        h = 16
        while h:  # gcd(cb, 16)
            g, h = h, g % h
        step = 16 // g  # samples per row for a multiple of 16 values
        q = step * max(1, (ROW_MIN + step * cb - 1) // (step * cb))
        if 16 * q > A:
            # a small batch: per-column coefficients would cost as much as the data; one sample
            # per row (no expansion at all when B == 1) unless a sample is very short
            q = 1 if cb >= 16 else max(1, min(A, (ROW_MIN + cb - 1) // cb))
        return q * cb, (A * cb) // (q * cb)
    return 0, 0


@njit(**_OPTS)
def _chunk(n, t, nthreads):
    """Thread ``t``'s share ``[lo, hi)`` of ``n`` items."""
    return n * t // nthreads, n * (t + 1) // nthreads


@njit(**_OPTS)
def _expand(v, W, C, B):
    """One value per column: ``out[j] = v[(j // B) % C]`` (nested loops: an integer division
    per value would cost more than the loops that use the result)."""
    if W == C:  # one sample per row and B == 1: the columns are the channels
        return v
    out = np.empty(W, v.dtype)
    j = 0
    while j < W:
        for c in range(C):
            vc = v[c]
            for _ in range(B):
                out[j] = vc
                j += 1
    return out


@njit(**_OPTS)
def _zeros(shape):
    # a separate (serial) function: inside a parallel=True one, np.zeros becomes a parallel
    # loop, and launching one costs more than zeroing a few per-channel values
    return np.zeros(shape)


@njit(**_OPTS)
def _padded(W):
    """A row length of at least ``W`` float64 values for per-thread accumulators: a multiple of
    a cache line plus one line, so that two threads' rows never share a cache line whatever the
    array's alignment (measured on 2 threads: channels_last 6 MB statistics 296 -> 278 and
    350 -> 303 us in two runs; the line at the boundary is written by both threads every block
    of rows)."""
    return (W + 7) // 8 * 8 + 8


@njit(**_OPTS)
def _rounded(v, like):
    """``v`` rounded to ``like``'s dtype."""
    out = np.empty(v.shape[0], like.dtype)
    for c in range(v.shape[0]):
        out[c] = v[c]
    return out


# --- statistics: sums of (x - k) and (x - k)^2 --------------------------------------------------
# Blocks (BLOCK_ROWS rows of the columns, RUN_BLOCK values of a run) are summed in the data's
# dtype, 16 float32 lanes wide, and each block's sums then added in float64. This is precise
# because k is close to the data: the mean of the channel's first values, and the statistics
# are taken again around the mean when the result says it was not (see _batch_stats).

#: rows per block of the column family's sums before they move to float64
BLOCK_ROWS = 16
#: values per block of a run's sums before they move to float64
RUN_BLOCK = 1024
#: values per channel averaged for the column family's shift
PILOT = 16


@njit(**_OPTS)
def _shift(x1, A, C, B, c0, c1):
    """The shift ``k`` of the statistics of channels ``c0 .. c1-1``, in the data's dtype: the
    mean of the channel's first value in each of the first ``PILOT`` samples."""
    m = c1 - c0
    acc = np.zeros(m)
    p = min(A, PILOT)
    for a in range(p):  # samples outside: the loop over channels vectorizes (5x on B == 1)
        base = (a * C + c0) * B
        if B == 1:
            xr = x1[base : base + m]
            for j in range(m):
                acc[j] += np.float64(xr[j])
        else:
            for j in range(m):
                acc[j] += np.float64(x1[base + j * B])
    k = np.empty(m, x1.dtype)
    for j in range(m):
        k[j] = acc[j] / p
    return k


@njit(**_OPTS)
def _col_sums(x2, kcol, r0, r1, p1, p2):
    W = x2.shape[1]
    a1 = np.empty(W, x2.dtype)
    a2 = np.empty(W, x2.dtype)
    m = r0
    while m < r1:
        e = min(m + BLOCK_ROWS, r1)
        for j in range(W):
            a1[j] = 0
            a2[j] = 0
        for i in range(m, e):
            xr = x2[i]  # a row: indices from 0 let LLVM drop the negative-index checks
            for j in range(W):
                d = xr[j] - kcol[j]
                a1[j] += d
                a2[j] += d * d
        for j in range(W):
            p1[j] += a1[j]
            p2[j] += a2[j]
        m = e


@njit(**_INLINE)  # inlined: a call per run cost 10-15% on runs of 256 (measured)
def _run_sum(x1, base, B, kc):
    """Float64 ``(sum(x - kc), sum((x - kc)^2))`` over the run ``x1[base : base + B]``: blocks
    summed in x's dtype (16 lanes), then added in float64."""
    t1 = 0.0
    t2 = 0.0
    i = 0
    while i < B:
        e = min(i + RUN_BLOCK, B)
        xb = x1[base + i : base + e]  # a slice: indices from 0 let LLVM vectorize
        u1 = kc - kc
        u2 = kc - kc
        for j in range(xb.shape[0]):
            d = xb[j] - kc
            u1 += d
            u2 += d * d
        t1 += u1
        t2 += u2
        i = e
    return t1, t2


@njit(**_OPTS)
def _run_sums(x1, C, B, k, r0, r1, o1, o2):
    """Sums of runs ``r0 .. r1-1`` (run ``r`` is ``x1[r*B : (r+1)*B]``, of channel ``r % C``)
    into ``o1[r]``, ``o2[r]``."""
    c = r0 % C  # the channel advances with the run: no integer division per run (tens of
    # cycles each, as much as summing a short run)
    for r in range(r0, r1):
        o1[r], o2[r] = _run_sum(x1, r * B, B, k[c])
        c += 1
        if c == C:
            c = 0


@njit(**_OPTS)
def _sums_part(x1, A, C, B, W, rows, k, kcol, t, nthreads, p1, p2, o1, o2):
    """Thread ``t``'s share of the statistics pass."""
    if W > 0:
        lo, hi = _chunk(rows, t, nthreads)
        _col_sums(x1[: rows * W].reshape(rows, W), kcol, lo, hi, p1[t], p2[t])
    elif W < 0:  # wide blocks of -W channels
        lo, hi = _chunk(C, t, nthreads)
        _wide_range(x1, x1, A, C, B, k, -W, lo, hi, o1, o2, False)
    else:
        lo, hi = _chunk(A * C, t, nthreads)
        _run_sums(x1, C, B, k, lo, hi, o1, o2)


@njit(**_OPTS)
def _fold(x1, g1, A, C, B, W, rows, k, p1, p2, o1, o2, dots):
    """Per-channel float64 sums from the threads' column sums (and the tail) or the runs' (the
    wide blocks' are per channel already)."""
    if W < 0:
        return o1, o2
    s1 = np.zeros(C)
    s2 = np.zeros(C)
    if W > 0:
        for t in range(p1.shape[0]):
            j = 0
            while j < W:
                for c in range(C):
                    for _ in range(B):
                        s1[c] += p1[t, j]
                        s2[c] += p2[t, j]
                        j += 1
        # the tail: the samples that do not fill a row, one value at a time
        i = rows * W
        while i < x1.shape[0]:
            for c in range(C):
                kc = np.float64(k[c])
                for _ in range(B):
                    d = np.float64(x1[i]) - kc
                    if dots:
                        g = np.float64(g1[i])
                        s1[c] += g
                        s2[c] += g * d
                    else:
                        s1[c] += d
                        s2[c] += d * d
                    i += 1
    else:
        r = 0
        for _ in range(A):
            for c in range(C):
                s1[c] += o1[r]
                s2[c] += o2[r]
                r += 1
    return s1, s2


@njit(**_INLINE)
def _sums(x1, A, C, B, k, nthreads, omp):
    """Per-channel float64 ``(sum(x - k), sum((x - k)^2))``; ``k`` is (C,) in x's dtype."""
    W, rows = _reduction_plan(A, C, B, x1.itemsize, 1, nthreads)
    kcol = _expand(k, max(W, 0), C, B)
    p1 = _zeros((nthreads, _padded(max(W, 0))))
    p2 = _zeros((nthreads, _padded(max(W, 0))))
    o1 = _zeros(A * C if W == 0 else (C if W < 0 else 0))
    o2 = _zeros(A * C if W == 0 else (C if W < 0 else 0))
    if nthreads == 1:
        _sums_part(x1, A, C, B, W, rows, k, kcol, nthreads - 1, nthreads, p1, p2, o1, o2)
    elif omp.size:
        blk = _sums_block(x1, x1, A, C, B, W, rows, k, kcol, nthreads, p1, p2, o1, o2, omp)
        _omp_parallel(omp[0], omp[3], blk.ctypes.data, nthreads)
        _alive((blk, kcol))
    else:
        for t in prange(nthreads):  # (t is unsigned here: cast, or the part compiles twice)
            _sums_part(x1, A, C, B, W, rows, k, kcol, np.int64(t), nthreads, p1, p2, o1, o2)
    return _fold(x1, x1, A, C, B, W, rows, k, p1, p2, o1, o2, False)


@njit(**_OPTS)
def _far(mean, var, k):
    """Whether some channel's shift was more than 3 standard deviations from its mean."""
    far = 0
    for c in range(mean.shape[0]):  # a count, not an early return: the loop vectorizes
        d = mean[c] - np.float64(k[c])
        if d * d > 9.0 * var[c]:
            far += 1
    return far > 0


@njit(**_INLINE)
def _batch_stats(x1, A, C, B, nthreads, omp):
    """Per-channel float64 mean and biased variance, and whether all are finite.

    The column family sums in the data's dtype around ``k``, which is precise only while
    ``k`` is near the mean (the rounding of ``(x - k)^2`` grows with ``(mean - k)^2``); if the
    pilot shift was more than 3 standard deviations off, the sums are taken again around the
    mean itself (one more read of x, in rare cases only).
    """
    k = _shift(x1, A, C, B, _ZERO, C)
    mean = np.empty(C)
    var = np.empty(C)
    finite = True
    for attempt in range(2):
        s1, s2 = _sums(x1, A, C, B, k, nthreads, omp)
        mean, var, finite = _mean_var(s1, s2, k, A * B)
        if attempt == 1 or not finite or not _far(mean, var, k):
            break
        k = _rounded(mean, x1)
    return mean, var, finite


# --- backward sums: sum(dy) and sum(dy * (x - k)), k = the mean rounded to x's dtype ------------


@njit(**_OPTS)
def _col_dots(g2, x2, kcol, r0, r1, p1, p2):
    W = x2.shape[1]
    a1 = np.empty(W, x2.dtype)
    a2 = np.empty(W, x2.dtype)
    m = r0
    while m < r1:
        e = min(m + BLOCK_ROWS, r1)
        for j in range(W):
            a1[j] = 0
            a2[j] = 0
        for i in range(m, e):
            gr = g2[i]  # rows: indices from 0 let LLVM drop the negative-index checks
            xr = x2[i]
            for j in range(W):
                g = gr[j]
                a1[j] += g
                a2[j] += g * (xr[j] - kcol[j])
        for j in range(W):
            p1[j] += a1[j]
            p2[j] += a2[j]
        m = e


@njit(**_INLINE)  # inlined: a call per run cost 10-15% on runs of 256 (measured)
def _run_dot(g1, x1, base, B, kc):
    """:func:`_run_sum` for ``(sum(dy), sum(dy * (x - kc)))``."""
    t1 = 0.0
    t2 = 0.0
    i = 0
    while i < B:
        e = min(i + RUN_BLOCK, B)
        gb = g1[base + i : base + e]
        xb = x1[base + i : base + e]
        u1 = kc - kc
        u2 = kc - kc
        for j in range(xb.shape[0]):
            g = gb[j]
            u1 += g
            u2 += g * (xb[j] - kc)
        t1 += u1
        t2 += u2
        i = e
    return t1, t2


@njit(**_OPTS)
def _run_dots(g1, x1, C, B, k, r0, r1, o1, o2):
    """:func:`_run_sums`' layout for ``sum(dy)`` and ``sum(dy * (x - k))``."""
    c = r0 % C
    for r in range(r0, r1):
        o1[r], o2[r] = _run_dot(g1, x1, r * B, B, k[c])
        c += 1
        if c == C:
            c = 0


@njit(**_OPTS)
def _dots_part(g1, x1, A, C, B, W, rows, k, kcol, t, nthreads, p1, p2, o1, o2):
    """Thread ``t``'s share of the backward reductions."""
    if W > 0:
        lo, hi = _chunk(rows, t, nthreads)
        n = rows * W
        _col_dots(g1[:n].reshape(rows, W), x1[:n].reshape(rows, W), kcol, lo, hi, p1[t], p2[t])
    elif W < 0:  # wide blocks of -W channels
        lo, hi = _chunk(C, t, nthreads)
        _wide_range(g1, x1, A, C, B, k, -W, lo, hi, o1, o2, True)
    else:
        lo, hi = _chunk(A * C, t, nthreads)
        _run_dots(g1, x1, C, B, k, lo, hi, o1, o2)


@njit(**_INLINE)
def _dots(g1, x1, A, C, B, mean, nthreads, omp):
    """Per-channel float64 ``(sum(dy), sum(dy * (x - mean)))`` for a float64 ``mean``."""
    W, rows = _reduction_plan(A, C, B, x1.itemsize, 2, nthreads)
    k = _rounded(mean, x1)  # near the data, x - k is exact in x's dtype
    kcol = _expand(k, max(W, 0), C, B)
    p1 = _zeros((nthreads, _padded(max(W, 0))))
    p2 = _zeros((nthreads, _padded(max(W, 0))))
    o1 = _zeros(A * C if W == 0 else (C if W < 0 else 0))
    o2 = _zeros(A * C if W == 0 else (C if W < 0 else 0))
    if nthreads == 1:
        _dots_part(g1, x1, A, C, B, W, rows, k, kcol, nthreads - 1, nthreads, p1, p2, o1, o2)
    elif omp.size:
        blk = _sums_block(g1, x1, A, C, B, W, rows, k, kcol, nthreads, p1, p2, o1, o2, omp)
        _omp_parallel(omp[0], omp[4], blk.ctypes.data, nthreads)
        _alive((blk, kcol))
    else:
        for t in prange(nthreads):
            _dots_part(g1, x1, A, C, B, W, rows, k, kcol, np.int64(t), nthreads, p1, p2, o1, o2)
    s1, s2 = _fold(x1, g1, A, C, B, W, rows, k, p1, p2, o1, o2, True)
    for c in range(C):  # sum(dy * (x - mean)) = sum(dy * (x - k)) - (mean - k) * sum(dy)
        s2[c] -= (mean[c] - np.float64(k[c])) * s1[c]
    return s1, s2


# --- elementwise: y = (x - k) * s + o  and  dx = a * dy + b * (x - k) + c ---------------------


@njit(**_OPTS)
def _zero(v):
    """Whether every value of ``v`` is zero: the shifts of a direct pass (see DIRECT_MAX)."""
    nonzero = 0
    for j in range(v.shape[0]):  # a count, not an early exit: the loop vectorizes
        nonzero += v[j] != 0
    return nonzero == 0


@njit(**_OPTS)
def _col_affine(x2, kc, sc, oc, y2, r0, r1):
    W = x2.shape[1]
    if _zero(kc):  # no shift (see DIRECT_MAX): x - 0 is x, one array fewer to read per value
        for m in range(r0, r1):
            xr = x2[m]
            yr = y2[m]
            for j in range(W):
                yr[j] = xr[j] * sc[j] + oc[j]
        return
    for m in range(r0, r1):
        xr = x2[m]  # rows: indices from 0 let LLVM drop the negative-index checks
        yr = y2[m]
        for j in range(W):
            yr[j] = (xr[j] - kc[j]) * sc[j] + oc[j]


@njit(**_INLINE)  # inlined: a call per run cost 10-15% on runs of 256 (measured)
def _affine_run(x1, y1, base, B, kc, sc, oc):
    xr = x1[base : base + B]
    yr = y1[base : base + B]
    for i in range(B):
        yr[i] = (xr[i] - kc) * sc + oc


@njit(**_OPTS)
def _run_affine(x1, C, B, k, s, o, y1, r0, r1):
    c = r0 % C
    for r in range(r0, r1):
        _affine_run(x1, y1, r * B, B, k[c], s[c], o[c])
        c += 1
        if c == C:
            c = 0


@njit(**_OPTS)
def _affine_part(x1, y1, A, C, B, W, rows, k, s, o, kc, sc, oc, t, nthreads):
    """Thread ``t``'s share of ``y = (x - k) * s + o`` (the last thread also does the tail)."""
    if W > 0:
        lo, hi = _chunk(rows, t, nthreads)
        n = rows * W
        _col_affine(x1[:n].reshape(rows, W), kc, sc, oc, y1[:n].reshape(rows, W), lo, hi)
        if t == nthreads - 1:  # the tail: samples that do not fill a row
            i = n
            while i < x1.shape[0]:
                for c in range(C):
                    for _ in range(B):
                        y1[i] = (x1[i] - k[c]) * s[c] + o[c]
                        i += 1
    elif W < 0:  # wide blocks of -W channels
        lo, hi = _chunk(C, t, nthreads)
        _wide_affine_range(x1, y1, A, C, B, k, s, o, -W, lo, hi)
    else:
        lo, hi = _chunk(A * C, t, nthreads)
        _run_affine(x1, C, B, k, s, o, y1, lo, hi)


@njit(**_INLINE)
def _affine(x1, A, C, B, k, s, o, y1, nthreads, omp):
    """``y = (x - k) * s + o`` per channel; ``k, s, o`` are (C,) arrays of the data's dtype."""
    W, rows = _reduction_plan(A, C, B, x1.itemsize, 1, nthreads)
    kc = _expand(k, max(W, 0), C, B)
    sc = _expand(s, max(W, 0), C, B)
    oc = _expand(o, max(W, 0), C, B)
    if nthreads == 1:
        _affine_part(x1, y1, A, C, B, W, rows, k, s, o, kc, sc, oc, nthreads - 1, nthreads)
    elif omp.size:
        blk = _block((  # _AFFINE_BLOCK slots
            omp[1], x1.ctypes.data, y1.ctypes.data, A, C, B, W, rows, k.ctypes.data, s.ctypes.data,
            o.ctypes.data, kc.ctypes.data, sc.ctypes.data, oc.ctypes.data, nthreads, omp[2],
        ))  # fmt: skip
        _omp_parallel(omp[0], omp[5], blk.ctypes.data, nthreads)
        _alive((blk, k, s, o, kc, sc, oc))
    else:
        for t in prange(nthreads):
            _affine_part(x1, y1, A, C, B, W, rows, k, s, o, kc, sc, oc, np.int64(t), nthreads)


@njit(**_OPTS)
def _col_grad(g2, x2, kc, ac, bc, cc, d2, r0, r1):
    W = x2.shape[1]
    if _zero(kc):  # no shift (see DIRECT_MAX): one array fewer to read per value
        for m in range(r0, r1):
            gr = g2[m]
            xr = x2[m]
            dr = d2[m]
            for j in range(W):
                dr[j] = ac[j] * gr[j] + bc[j] * xr[j] + cc[j]
        return
    for m in range(r0, r1):
        gr = g2[m]  # rows: indices from 0 let LLVM drop the negative-index checks
        xr = x2[m]
        dr = d2[m]
        for j in range(W):
            dr[j] = ac[j] * gr[j] + bc[j] * (xr[j] - kc[j]) + cc[j]


@njit(**_INLINE)  # inlined: a call per run cost 10-15% on runs of 256 (measured)
def _grad_run(g1, x1, d1, base, B, kc, ac, bc, cc):
    gr = g1[base : base + B]
    xr = x1[base : base + B]
    dr = d1[base : base + B]
    for i in range(B):
        dr[i] = ac * gr[i] + bc * (xr[i] - kc) + cc


@njit(**_OPTS)
def _run_grad(g1, x1, C, B, k, a, b, c_, d1, r0, r1):
    c = r0 % C
    for r in range(r0, r1):
        _grad_run(g1, x1, d1, r * B, B, k[c], a[c], b[c], c_[c])
        c += 1
        if c == C:
            c = 0


@njit(**_OPTS)
def _grad_part(g1, x1, d1, A, C, B, W, rows, co, cols, t, nthreads):
    """Thread ``t``'s share of ``dx = a * dy + b * (x - k) + c`` (``co``: the (4, C)
    coefficients k, a, b, c; ``cols``: the same expanded to (4, W))."""
    if W > 0:
        lo, hi = _chunk(rows, t, nthreads)
        n = rows * W
        _col_grad(
            g1[:n].reshape(rows, W), x1[:n].reshape(rows, W),
            cols[0], cols[1], cols[2], cols[3], d1[:n].reshape(rows, W), lo, hi,
        )  # fmt: skip
        if t == nthreads - 1:  # the tail: samples that do not fill a row
            i = n
            while i < x1.shape[0]:
                for c in range(C):
                    for _ in range(B):
                        d1[i] = co[1, c] * g1[i] + co[2, c] * (x1[i] - co[0, c]) + co[3, c]
                        i += 1
    elif W < 0:  # wide blocks of -W channels
        lo, hi = _chunk(C, t, nthreads)
        _wide_grad_range(g1, x1, d1, A, C, B, co, -W, lo, hi)
    else:
        lo, hi = _chunk(A * C, t, nthreads)
        _run_grad(g1, x1, C, B, co[0], co[1], co[2], co[3], d1, lo, hi)


@njit(**_OPTS)
def _expand_rows(co, W, C, B):
    if W == C:
        return co
    out = np.empty((co.shape[0], W), co.dtype)
    for r in range(co.shape[0]):
        out[r] = _expand(co[r], W, C, B)
    return out


@njit(**_INLINE)
def _grad(g1, x1, A, C, B, co, d1, nthreads, omp):
    """``dx = a * dy + b * (x - k) + c`` per channel, ``co`` = (4, C) rows k, a, b, c."""
    W, rows = _reduction_plan(A, C, B, x1.itemsize, 2, nthreads)
    cols = _expand_rows(co, max(W, 0), C, B)
    if nthreads == 1:
        _grad_part(g1, x1, d1, A, C, B, W, rows, co, cols, nthreads - 1, nthreads)
    elif omp.size:
        blk = _block((  # _GRAD_BLOCK slots
            omp[1], g1.ctypes.data, x1.ctypes.data, d1.ctypes.data, A, C, B, W, rows,
            co.ctypes.data, cols.ctypes.data, nthreads, omp[2],
        ))  # fmt: skip
        _omp_parallel(omp[0], omp[6], blk.ctypes.data, nthreads)
        _alive((blk, co, cols))
    else:
        for t in prange(nthreads):
            _grad_part(g1, x1, d1, A, C, B, W, rows, co, cols, np.int64(t), nthreads)


# --- per-channel math (C values, or a block's) ---------------------------------------------------


@njit(**_OPTS)
def _mean_var(s1, s2, k, n):
    """Mean and biased variance from the shifted sums; ``finite`` is False if any is NaN/Inf."""
    C = s1.shape[0]
    mean = np.empty(C)
    var = np.empty(C)
    bad = 0.0  # NaN iff some value is NaN or infinite (x * 0 is then NaN): a vectorized check
    for c in range(C):
        d = s1[c] / n
        mean[c] = np.float64(k[c]) + d
        var[c] = max(s2[c] / n - d * d, 0.0)
        bad += mean[c] * 0.0 + var[c] * 0.0
    return mean, var, bad == 0.0


#: ``var + eps`` within these bounds takes the fast ``1 / sqrt`` for float32 data (well inside
#: float32's normal numbers, where its estimate is good); anything else (tiny ``eps``, huge or
#: non-finite variances) the exact one
FAST_MIN = 1e-30
FAST_MAX = 1e30


@njit(**_INLINE)
def _inv_sqrt(t, exact):
    """``1 / sqrt(t)`` in float64, ``t`` within ``[FAST_MIN, FAST_MAX]`` unless ``exact``.

    Exact: float64's square root and division, correctly rounded, but slow: they vectorize
    only 4 wide, about 1.8 ns a value here, which on very wide inputs (131072 channels of 2
    values) costs more than reading the data. Fast, for float32 data: a float32 estimate (the
    compiler makes it from the rsqrt instruction and a Newton step, to about 1e-7), refined by
    two Newton steps in float64, ``r <- r * (1.5 - 0.5 * t * r * r)``, each of which squares the
    relative error (1e-7 -> 1e-14 -> rounding): within two units in the last place of the
    exact value (4.5e-16 relative, tested over the whole range), at 0.7 ns a value (measured,
    4096 values in cache)."""
    if exact:
        return 1.0 / np.sqrt(t)
    r = np.float64(np.float32(1.0) / np.sqrt(np.float32(t)))
    r = r * (1.5 - 0.5 * t * r * r)
    return r * (1.5 - 0.5 * t * r * r)


@njit(**_INLINE)
def _outside_fast(t):
    """1 where ``t`` is outside the fast ``1 / sqrt``'s range, else 0 (summed into a count: a
    count, not an early exit, lets the loops vectorize)."""
    return 1 if t < FAST_MIN or t > FAST_MAX else 0


@njit(**_OPTS)
def _invstd_into(var, eps, like, out):
    """``out[c] = 1 / sqrt(var[c] + eps)`` (float64; ``out`` may be ``var``): fast for float32
    ``like`` when every value is in range, else exact (see :func:`_inv_sqrt`)."""
    exact = like.itemsize != 4
    if not exact:  # counted before any value is written: ``out`` may be ``var`` itself
        bad = 0
        for c in range(var.shape[0]):
            bad += _outside_fast(np.float64(var[c]) + eps)
        exact = bad > 0
    for c in range(var.shape[0]):
        out[c] = _inv_sqrt(np.float64(var[c]) + eps, exact)


#: With short runs (``B < RUN_MIN``: the column family and wide blocks, whose loops read one
#: coefficient per value from an array), a channel whose mean lies within this many standard
#: deviations of zero is normalized without a shift, as ``y = x * s + o`` and
#: ``dx = a * dy + b * x + c``: a loop whose shifts are all zero reads one array fewer per value
#: (measured, evaluation kernels alone on 2 threads, old and new alternating in one process,
#: three runs each on the AMD machine: (8192, 256) 1.08-1.22x, channels_last 32x256x14x14
#: 1.04-1.07x, channels_last 64x64x28x28 1.06-1.24x as fast; a training step, whose passes
#: over the columns are the sums, 0.99-1.04x). The shift only guards against cancellation:
#: without it, ``x * s`` and ``o`` are each about ``|mean| * |s|`` larger than the output, so
#: rounding adds at most about ``2 * DIRECT_MAX`` units in the last place of ``|w|`` (float32:
#: 5e-7 |w|), the size of the output's own rounding; far from zero the shift stays and the
#: output keeps its digits.
DIRECT_MAX = 4.0


@njit(**_INLINE)
def _shift_of(m, invstd, direct, like):
    """The shift ``k`` of the elementwise steps for a channel of mean ``m``: ``m`` rounded to
    ``like``'s dtype, or 0 with ``direct`` where ``|m| * invstd <= DIRECT_MAX``."""
    if direct and abs(m) * invstd <= DIRECT_MAX:
        return like.dtype.type(0)
    return like.dtype.type(m)


@njit(**_OPTS)
def _fill_coefficients(mean, v, w, b, has_w, has_b, eps, mode, direct, k, s, o):
    """Fills ``k, s, o`` (x's dtype) with ``y = (x - k) * s + o`` equal to
    ``(x - mean) * invstd * w + b``: ``k`` is the mean rounded, ``o`` absorbs the rounding
    (with ``direct``, ``k`` is 0 for a mean near zero: see :data:`DIRECT_MAX`).
    ``v`` is ``invstd`` (``mode`` 0) or the variance, whose ``1 / sqrt(v + eps)`` is taken in
    the same loop, exactly (1) or fast (2: see :func:`_inv_sqrt`). Returns how many
    ``v + eps`` were outside the fast range (with mode 2 their values are then wrong)."""
    bad = 0
    for c in range(mean.shape[0]):
        m = np.float64(mean[c])
        if mode == 0:
            invstd = np.float64(v[c])
        else:
            t = np.float64(v[c]) + eps
            bad += _outside_fast(t)
            invstd = _inv_sqrt(t, mode == 1)
        scale = invstd * (np.float64(w[c]) if has_w else 1.0)
        kc = _shift_of(m, invstd, direct, k)
        k[c] = kc
        s[c] = scale
        o[c] = (np.float64(b[c]) if has_b else 0.0) - (m - np.float64(kc)) * scale
    return bad


@njit(**_OPTS)
def _coefficients(mean, v, w, b, has_w, has_b, like, direct, eps=-1.0):
    """``(k, s, o)`` in ``like``'s dtype (see :func:`_fill_coefficients`) from the mean and
    ``invstd``, or with ``eps >= 0`` from the mean and the variance (any dtype: the fast
    ``1 / sqrt`` for float32 data, the exact one for float64 or where a value is out of the
    fast one's range)."""
    C = mean.shape[0]
    k = np.empty(C, like.dtype)
    s = np.empty(C, like.dtype)
    o = np.empty(C, like.dtype)
    if eps < 0:
        _fill_coefficients(mean, v, w, b, has_w, has_b, 0.0, 0, direct, k, s, o)
    elif like.itemsize != 4:
        _fill_coefficients(mean, v, w, b, has_w, has_b, eps, 1, direct, k, s, o)
    elif _fill_coefficients(mean, v, w, b, has_w, has_b, eps, 2, direct, k, s, o) > 0:
        _fill_coefficients(mean, v, w, b, has_w, has_b, eps, 1, direct, k, s, o)
    return k, s, o


@njit(**_OPTS)
def _grad_coefficients(mean, invstd, w, has_w, sum_dy, sum_dy_xmu, n, like, direct):
    """Rows ``k, a, b, c`` of a (4, C) array in ``like``'s dtype with
    ``dx = a*dy + b*(x - k) + c`` the input gradient of training-mode batch norm:
    ``a = w*invstd``, ``b = -a*invstd^2*sum(dy*(x-mean))/n``, ``c = -a*sum(dy)/n`` (moved by
    ``b * (mean - k)`` since ``k`` is the mean rounded to the data's dtype, or with ``direct``
    0 for a mean near zero: see :data:`DIRECT_MAX`)."""
    C = mean.shape[0]
    co = np.empty((4, C), like.dtype)
    for c in range(C):
        k = _shift_of(np.float64(mean[c]), np.float64(invstd[c]), direct, co)
        ac = (np.float64(w[c]) if has_w else 1.0) * invstd[c]
        bc = -ac * invstd[c] * invstd[c] * sum_dy_xmu[c] / n
        co[0, c] = k
        co[1, c] = ac
        co[2, c] = bc
        co[3, c] = -ac * sum_dy[c] / n - bc * (mean[c] - np.float64(k))
    return co


# --- channel blocks: the training passes of contiguous data, fused per block of channels -----
# A training forward reads x twice (statistics, then y) and a backward reads dy and x twice
# (sums, then dx): on a tensor larger than the cores' caches, every second read comes from
# memory again. For contiguous (N, C, *) data with runs of RUN_MIN values or more, the channels
# are instead cut into blocks whose data fits in a core's cache; a thread takes a block, sums
# it, and makes its outputs right away, while the block is still in cache. The sums are the
# runs family's (_run_sum, _run_dot), added over the samples in the same order, so a block's
# statistics are those of the two-pass loops; only the re-summing around the mean (far shifts)
# is decided per block instead of for the whole tensor. They run serially or on torch's pool;
# on numba's pool (the fallback) the two-pass loops run instead: a prange loop of its own in
# each entry point cost 9 s more of compilation at the first call, measured. Whether runs take
# blocks at all is the caller's choice (``run_bytes``, 0 for none): they paid off on the Intel
# machines and lost on the AMD ones, where the two-pass loops' long sequential streams ran
# faster than a block's samples one after the other (see numba_cpu.RUN_BLOCK_BYTES).
#
# Wide blocks: runs shorter than RUN_MIN in a batch of at most WIDE_MAX_SAMPLES samples (say
# (8, 32768) or (2, 8192, 4, 4)). There the per-channel work is the cost, and the column family
# made arrays of C (and of W = C * B) values per call, as large as the data, whose fresh pages
# fault at every step, and split its few rows between threads. A wide block instead takes the
# channels c0 .. c1-1 of every sample, a contiguous segment of (c1 - c0) * B values each, sums
# it per value over the samples in float64 (two samples at a time), adds the B values of each
# channel, and writes its outputs with coefficients expanded over the segment: per-value scratch
# of at most WIDE_COLS values, made once per thread. With one value per channel (B == 1) the
# segment's values are the channels and nothing is expanded.
#
# With a few values per channel, every pass over a block's channels counts, and so does every
# array of C values (on this machine a thread streams such an array from L3 at about 10 GB/s):
# a block's coefficients come from its mean and variance in one loop (_coefficients with eps),
# whose 1 / sqrt is the fast one for float32 data (_inv_sqrt: float64's square root and
# division alone cost 1.8 ns a channel); the first pair of samples stores its sums instead of
# adding them to zeroed scratch; and once every block of the forward is done (a barrier: the
# batch must be known finite first), each thread moves the running statistics of its own
# channels and turns their variance into invstd (_finish_forward). Measured, the kernels alone
# on 2 threads, the code before and after in one process, alternating (41 rounds): (2, 131072)
# forward 1.04x and 1.07x as fast in two runs, backward 1.03x and 1.20x, evaluation 1.48x and
# 1.42x; (2, 8192, 4, 4) 1.26x, 1.47x and 1.64x; the default bench shapes 0.91-1.03x (noise).

#: bytes a channel block may hold in the arrays it reads twice (x; dy and x in backward): half
#: the 2 MB per-core L2 of the Intel machines measured, leaving room for the output. (Measured
#: there on 64x64x28x28 float32, forward on 2 threads: blocks of 2 channels, 400 KB, 908 us; 4,
#: 819 us; 8, 844 us; the two-pass loops 1213 us.) Wide blocks always take this budget; the run
#: family's blocks take the one the caller passes (``run_bytes``), because they pay off on some
#: processors only: on the AMD machines (Zen 4, 1 MB L2 per core, 32 MB L3) the two-pass loops
#: were faster at every budget tried (numba_cpu.RUN_BLOCK_BYTES chooses, per processor).
BLOCK_BYTES = 1 << 20
#: the blocked passes split channels between threads, so they need a few channels per thread
#: for balance (the two-pass loops split the values)
BLOCK_MIN_CHANNELS = 4
#: *wide* blocks (runs shorter than RUN_MIN) cover at most this many values of a sample: their
#: per-value scratch (float64 sums, expanded coefficients: 40 bytes a value) stays in L2
WIDE_COLS = 4096
#: the blocked training forward finishes (running statistics, invstd) on every thread, after a
#: barrier, from this many channels; below, the calling thread does it after the parallel region,
#: which costs less than the barrier (a serial pass takes 1.5-3 ns a channel here)
FINISH_MIN_CHANNELS = 4096
#: short runs take wide blocks only in batches of at most this many samples (rows); taller
#: data goes to the column family, whose per-column sums cost little once spread over many
#: rows, while a wide block's segments of one sample get short. (Measured, float32 training
#: step on 2 threads, B = 1, 4 and 16: at 1 MB wide blocks were 2.3-3.4x faster with 8
#: samples, 1.2-1.7x with 32 and 64, even with 128, and 1.2-2x slower from 256; at 8 MB
#: 1.2-3x faster up to 128 samples and 1.1-2.5x slower from 512.)
WIDE_MAX_SAMPLES = 128


@njit(**_OPTS)
def channel_block(A, C, B, itemsize, arrays, nthreads, run_bytes):
    """The most channels per block of the blocked passes over ``arrays`` arrays of
    ``itemsize``-byte values, or 0 where they do not apply: fewer than ``BLOCK_MIN_CHANNELS``
    channels per thread, one channel alone larger than the budget, or spatial runs shorter
    than ``RUN_MIN`` in a batch of more than ``WIDE_MAX_SAMPLES`` samples (the column family).
    Short runs in smaller batches take *wide* blocks of at most ``WIDE_COLS`` values per sample
    and ``BLOCK_BYTES``; runs of ``RUN_MIN`` values and more take blocks of at most
    ``run_bytes`` (0: none, the two-pass loops run)."""
    per_channel = A * B * itemsize * arrays
    budget = BLOCK_BYTES if B < RUN_MIN else run_bytes
    if C < BLOCK_MIN_CHANNELS * nthreads or per_channel > budget:
        return 0
    cb = budget // per_channel
    if B < RUN_MIN:
        if A > WIDE_MAX_SAMPLES:
            return 0
        cb = min(cb, max(1, WIDE_COLS // B))
    return cb


@njit(**_OPTS)
def _block_bounds(lo, hi, cb, i):
    """Channels ``[c0, c1)`` of block ``i`` when ``[lo, hi)`` is cut into blocks of at most
    ``cb`` channels, as equal as they can be."""
    nb = (hi - lo + cb - 1) // cb
    return lo + (hi - lo) * i // nb, lo + (hi - lo) * (i + 1) // nb


@njit(**_OPTS)
def _expanded(v, B, out):
    """Per-channel values ``v``, one per value of a wide block's segment: ``v`` itself when
    ``B == 1``, else ``out`` (scratch) filled with ``out[j * B + i] = v[j]``."""
    if B == 1:
        return v
    for j in range(v.shape[0]):
        vj = v[j]
        o = out[j * B : (j + 1) * B]  # a slice per channel: its stores vectorize (2.7x on B = 16)
        for i in range(B):
            o[i] = vj
    return out


@njit(**_OPTS)
def _wide_rows(g1, x1, kcol, p1, p2, b0, b1, dots, first):
    """Adds two samples' segments (at ``b0`` and ``b1``; ``b1 < 0``: one sample) to the
    per-value float64 sums ``p1``, ``p2`` (see :func:`_wide_sums`), or with ``first`` stores
    them there (no pass to zero the scratch first). Two at a time: the sums are read and
    written once per pair of samples."""
    cols = kcol.shape[0]
    xa = x1[b0 : b0 + cols]  # slices: indices from 0 let LLVM vectorize
    ga = g1[b0 : b0 + cols]
    pair = b1 >= 0
    xb = x1[b1 : b1 + cols] if pair else xa
    gb = g1[b1 : b1 + cols] if pair else ga
    h = 1.0 if pair else 0.0  # one sample: the second term is the first's, times 0
    for u in range(cols):
        d = np.float64(xa[u] - kcol[u])
        e = np.float64(xb[u] - kcol[u])
        if dots:
            g = np.float64(ga[u])
            f = np.float64(gb[u]) * h
            t1 = g + f
            t2 = g * d + f * e
        else:
            t1 = d + e * h
            t2 = d * d + e * e * h
        if first:  # loop-invariant: the compiler makes a loop of each
            p1[u] = t1
            p2[u] = t2
        else:
            p1[u] += t1
            p2[u] += t2


@njit(**_OPTS)
def _wide_sums(g1, x1, A, C, B, c0, c1, kcol, p1, p2, dots):
    """Per-channel float64 sums of a wide block (channels ``c0 .. c1-1``, runs shorter than
    RUN_MIN): ``sum(x - k)`` and ``sum((x - k)^2)``, or with ``dots`` ``sum(dy)`` and
    ``sum(dy * (x - k))``. Each sample's segment of the block is contiguous; the sums are
    taken per value of the segment over the samples in float64 (``p1``, ``p2``: scratch of at
    least a segment), then added per channel. ``x - k`` is taken in x's dtype, as the column
    family does, ``k`` expanded in ``kcol`` (a segment's length). With ``B == 1`` the sums
    returned are ``p1`` and ``p2`` themselves (their first ``c1 - c0`` values)."""
    m = c1 - c0
    cols = m * B
    kc = kcol[:cols]
    q1 = p1[:cols]
    q2 = p2[:cols]
    a = 0
    while a < A:
        b0 = (a * C + c0) * B
        b1 = ((a + 1) * C + c0) * B if a + 1 < A else -1
        _wide_rows(g1, x1, kc, q1, q2, b0, b1, dots, a == 0)
        a += 2
    if B == 1:  # the per-value sums are the channels' (views of the scratch: no copy)
        return q1, q2
    s1 = np.empty(m)
    s2 = np.empty(m)
    for j in range(m):
        r1 = q1[j * B : (j + 1) * B]
        r2 = q2[j * B : (j + 1) * B]
        t1 = 0.0
        t2 = 0.0
        for i in range(B):
            t1 += r1[i]
            t2 += r2[i]
        s1[j] = t1
        s2[j] = t2
    return s1, s2


@njit(**_OPTS)
def _wide_affine(x1, y1, A, C, B, c0, c1, kcol, scol, ocol):
    """``y = (x - k) * s + o`` over a wide block, the coefficients expanded per value."""
    cols = (c1 - c0) * B
    direct = _zero(kcol[:cols])  # no shift (see DIRECT_MAX): one array fewer per value
    for a in range(A):
        base = (a * C + c0) * B
        xr = x1[base : base + cols]
        yr = y1[base : base + cols]
        if direct:
            for u in range(cols):
                yr[u] = xr[u] * scol[u] + ocol[u]
        else:
            for u in range(cols):
                yr[u] = (xr[u] - kcol[u]) * scol[u] + ocol[u]


@njit(**_OPTS)
def _wide_grad(g1, x1, d1, A, C, B, c0, c1, kcol, acol, bcol, ccol):
    """``dx = a * dy + b * (x - k) + c`` over a wide block, the coefficients expanded."""
    cols = (c1 - c0) * B
    direct = _zero(kcol[:cols])  # no shift (see DIRECT_MAX): one array fewer per value
    for a in range(A):
        base = (a * C + c0) * B
        gr = g1[base : base + cols]
        xr = x1[base : base + cols]
        dr = d1[base : base + cols]
        if direct:
            for u in range(cols):
                dr[u] = acol[u] * gr[u] + bcol[u] * xr[u] + ccol[u]
        else:
            for u in range(cols):
                dr[u] = acol[u] * gr[u] + bcol[u] * (xr[u] - kcol[u]) + ccol[u]


@njit(**_OPTS)
def _block_sums(g1, x1, A, C, B, c0, c1, k, kcol, p1, p2, dots):
    """A block's per-channel float64 sums (see :func:`_wide_sums` for ``dots``): run by run
    (_run_sum, _run_dot) in memory order, each channel's added over the samples, or for short
    runs by :func:`_wide_sums`."""
    m = c1 - c0
    if B < RUN_MIN:
        return _wide_sums(g1, x1, A, C, B, c0, c1, _expanded(k, B, kcol), p1, p2, dots)
    s1 = np.zeros(m)
    s2 = np.zeros(m)
    for a in range(A):
        for j in range(m):
            if dots:
                t1, t2 = _run_dot(g1, x1, (a * C + c0 + j) * B, B, k[j])
            else:
                t1, t2 = _run_sum(x1, (a * C + c0 + j) * B, B, k[j])
            s1[j] += t1
            s2[j] += t2
    return s1, s2


@njit(**_OPTS)
def _block_affine(x1, y1, A, C, B, c0, c1, k, s, o, kcol, scol, ocol):
    """``y = (x - k) * s + o`` over the channels ``c0 .. c1-1`` of a block."""
    if B < RUN_MIN:
        _wide_affine(
            x1, y1, A, C, B, c0, c1,
            _expanded(k, B, kcol), _expanded(s, B, scol), _expanded(o, B, ocol),
        )  # fmt: skip
        return
    for a in range(A):
        for j in range(c1 - c0):
            _affine_run(x1, y1, (a * C + c0 + j) * B, B, k[j], s[j], o[j])


@njit(**_OPTS)
def _block_grad(g1, x1, d1, A, C, B, c0, c1, k, a, b, c, kcol, acol, bcol, ccol):
    """``dx = a * dy + b * (x - k) + c`` over the channels ``c0 .. c1-1`` of a block (``k, a,
    b, c``: the block's coefficients; the ``*col`` arrays: scratch for wide blocks)."""
    if B < RUN_MIN:
        _wide_grad(
            g1, x1, d1, A, C, B, c0, c1, _expanded(k, B, kcol), _expanded(a, B, acol),
            _expanded(b, B, bcol), _expanded(c, B, ccol),
        )  # fmt: skip
        return
    for sample in range(A):
        for j in range(c1 - c0):
            _grad_run(g1, x1, d1, (sample * C + c0 + j) * B, B, k[j], a[j], b[j], c[j])


@njit(**_OPTS)
def _wide_range(g1, x1, A, C, B, k, cb, lo, hi, o1, o2, dots):
    """The reductions of :func:`_sums` and :func:`_dots` (``dots``) over channels ``lo .. hi-1``
    by wide blocks of at most ``cb`` channels: per-channel sums into ``o1``, ``o2``, taken as
    the fused passes take them (:func:`_block_sums`), so both give the same statistics."""
    kcol, _, _, p1, p2 = _scratch(cb, B, x1)
    for i in range((hi - lo + cb - 1) // cb):
        c0, c1 = _block_bounds(lo, hi, cb, i)
        s1, s2 = _block_sums(g1, x1, A, C, B, c0, c1, k[c0:c1], kcol, p1, p2, dots)
        for j in range(c1 - c0):
            o1[c0 + j] = s1[j]
            o2[c0 + j] = s2[j]


@njit(**_OPTS)
def _wide_affine_range(x1, y1, A, C, B, k, s, o, cb, lo, hi):
    """:func:`_affine` over channels ``lo .. hi-1`` by wide blocks of at most ``cb``."""
    kcol, scol, ocol, _, _ = _scratch(cb, B, x1)
    for i in range((hi - lo + cb - 1) // cb):
        c0, c1 = _block_bounds(lo, hi, cb, i)
        _block_affine(x1, y1, A, C, B, c0, c1, k[c0:c1], s[c0:c1], o[c0:c1], kcol, scol, ocol)


@njit(**_OPTS)
def _wide_grad_range(g1, x1, d1, A, C, B, co, cb, lo, hi):
    """:func:`_grad` over channels ``lo .. hi-1`` by wide blocks of at most ``cb``."""
    kcol, acol, bcol, _, _ = _scratch(cb, B, x1)
    ccol = np.empty(kcol.shape[0], x1.dtype)
    for i in range((hi - lo + cb - 1) // cb):
        c0, c1 = _block_bounds(lo, hi, cb, i)
        _block_grad(
            g1, x1, d1, A, C, B, c0, c1, co[0, c0:c1], co[1, c0:c1], co[2, c0:c1], co[3, c0:c1],
            kcol, acol, bcol, ccol,
        )  # fmt: skip


@njit(**_OPTS)
def _reduction_plan(A, C, B, itemsize, arrays, nthreads):
    """``(W, rows)`` of the two-pass loops over ``arrays`` arrays read twice (1 for the
    statistics and ``y``, 2 for the backward's): :func:`plan`'s, or ``(-cb, 0)`` where the
    fused passes take wide blocks of ``cb`` channels (the two-pass loops then do too: threads
    split the channels, and no per-column array is made)."""
    cb = channel_block(A, C, B, itemsize, arrays, nthreads, 0)
    if cb > 0 and B < RUN_MIN:
        return -cb, 0
    return plan(A, C, B)


@njit(**_OPTS)
def _scratch(cb, B, like):
    """A wide block's per-value scratch (none for runs; no expansions for ``B == 1``): expanded
    k, s, o in x's dtype and the float64 sums, allocated once per call and reused by every
    block."""
    n = cb * B if B < RUN_MIN else 0
    return (
        np.empty(n, like.dtype), np.empty(n, like.dtype), np.empty(n, like.dtype),
        np.empty(n), np.empty(n),
    )  # fmt: skip


@njit(**_OPTS)
def _forward_blocks(x1, y1, A, C, B, cb, w, b, has_w, has_b, eps, stats, lo, hi):
    """The blocked training forward of channels ``lo .. hi-1``, in blocks of at most ``cb``:
    each block's statistics, then its ``y``; the per-channel math is _batch_stats' and
    _coefficients'. Returns whether every channel's statistics are finite. ``stats`` receives
    the mean and the *variance* (the caller updates the running statistics from them, then
    turns the variance into ``1 / sqrt(var + eps)`` by the formula used here): no array of
    ``C`` values is made, as on a very wide input it would be as large as the data."""
    n = A * B
    kcol, scol, ocol, p1, p2 = _scratch(cb, B, x1)
    all_finite = True
    for i in range((hi - lo + cb - 1) // cb):
        c0, c1 = _block_bounds(lo, hi, cb, i)
        m = c1 - c0
        k = _shift(x1, A, C, B, c0, c1)
        mc = np.empty(m)
        vc = np.empty(m)
        finite = True
        for attempt in range(2):
            s1, s2 = _block_sums(x1, x1, A, C, B, c0, c1, k, kcol, p1, p2, False)
            mc, vc, finite = _mean_var(s1, s2, k, n)
            if attempt == 1 or not finite or not _far(mc, vc, k):
                break
            k = _rounded(mc, x1)  # sum again around the mean (the block is still in cache)
        all_finite = all_finite and finite
        for j in range(m):
            stats[0, c0 + j] = mc[j]
            stats[1, c0 + j] = vc[j]
        kk, s, o = _coefficients(mc, vc, w[c0:c1], b[c0:c1], has_w, has_b, x1, B < RUN_MIN, eps)
        _block_affine(x1, y1, A, C, B, c0, c1, kk, s, o, kcol, scol, ocol)
    return all_finite


@njit(**_OPTS)
def _backward_blocks(g1, x1, d1, A, C, B, cb, stats, w, has_w, flags, dw, db, lo, hi):
    """The blocked training backward of channels ``lo .. hi-1``, in blocks of at most ``cb``:
    each block's sums, its ``dweight``/``dbias`` (flags 2, 4), then its ``dx`` (flag 8); the
    per-channel math is _dots', _train_backward's and _grad_coefficients'."""
    n = A * B
    kcol, acol, bcol, p1, p2 = _scratch(cb, B, x1)
    ccol = np.empty(kcol.shape[0], x1.dtype)
    for i in range((hi - lo + cb - 1) // cb):
        c0, c1 = _block_bounds(lo, hi, cb, i)
        m = c1 - c0
        mean = stats[0, c0:c1]
        invstd = stats[1, c0:c1]
        k = _rounded(mean, x1)  # near the data, x - k is exact in x's dtype
        s1, s2 = _block_sums(g1, x1, A, C, B, c0, c1, k, kcol, p1, p2, True)
        for j in range(m):  # sum(dy * (x - mean)) = sum(dy * (x - k)) - (mean - k) * sum(dy)
            s2[j] -= (mean[j] - np.float64(k[j])) * s1[j]
            if (flags & 2) != 0:
                dw[c0 + j] = s2[j] * invstd[j]
            if (flags & 4) != 0:
                db[c0 + j] = s1[j]
        if (flags & 8) != 0:
            co = _grad_coefficients(mean, invstd, w[c0:c1], has_w, s1, s2, n, x1, B < RUN_MIN)
            _block_grad(
                g1, x1, d1, A, C, B, c0, c1, co[0], co[1], co[2], co[3], kcol, acol, bcol, ccol
            )


@njit(**_OPTS)
def _eval_blocks(x1, y1, A, C, B, cb, rm, rv, w, b, has_w, has_b, eps, lo, hi):
    """Evaluation ``y = (x - running_mean) / sqrt(running_var + eps) * w + b`` of channels
    ``lo .. hi-1`` in blocks of at most ``cb`` (wide data: many channels, few samples, where
    the per-channel coefficients of the whole tensor would cost as much as the data)."""
    kcol, scol, ocol, _, _ = _scratch(cb, B, x1)
    for i in range((hi - lo + cb - 1) // cb):
        c0, c1 = _block_bounds(lo, hi, cb, i)
        kk, s, o = _coefficients(
            rm[c0:c1], rv[c0:c1], w[c0:c1], b[c0:c1], has_w, has_b, x1, B < RUN_MIN, eps
        )
        _block_affine(x1, y1, A, C, B, c0, c1, kk, s, o, kcol, scol, ocol)


# --- the kernels, generic over the data's dtype -------------------------------------------------


@njit(**_INLINE)
def _train_forward(
    x1, y1, A, C, B, w, b, rm, rv, nbt, flags, momentum, eps, stats, nthreads, run_bytes, omp
):
    has_w = (flags & 1) != 0
    has_b = (flags & 2) != 0
    cb = channel_block(A, C, B, x1.itemsize, 1, nthreads, run_bytes)
    if cb > 0 and (nthreads == 1 or omp.size):
        # the blocks leave the variance in stats[1]; once every block is known finite, each
        # thread moves its channels' running statistics and turns their variance into invstd
        # (on very wide inputs a serial pass over C values cost as much as the blocks), or
        # with few channels the calling thread does it after the region (no barrier)
        rate = _running_rate(nbt, flags, momentum)
        in_region = C >= FINISH_MIN_CHANNELS
        if nthreads == 1:
            finite = _forward_blocks(x1, y1, A, C, B, cb, w, b, has_w, has_b, eps, stats, _ZERO, C)
        else:
            par = np.empty(2)  # eps and the rate, read through their address
            par[0] = eps
            par[1] = rate
            fin = np.ones(nthreads, np.uint8)  # per part: all its channels finite
            blk = _block((  # _FORWARD_BLOCKS_BLOCK slots
                omp[1], x1.ctypes.data, y1.ctypes.data, A, C, B, cb, w.ctypes.data, b.ctypes.data,
                flags, par.ctypes.data, stats.ctypes.data, fin.ctypes.data, nthreads, omp[2],
                rm.ctypes.data, rv.ctypes.data, omp[10] if in_region else 0,
            ))  # fmt: skip
            _omp_parallel(omp[0], omp[7], blk.ctypes.data, nthreads)
            _alive((blk, par, fin))
            finite = _parts_finite(fin)
        if nthreads == 1 or not in_region:
            _finish_forward(stats, rm, rv, flags, rate, eps, finite, A * B, x1, _ZERO, C)
        if finite and (flags & 12) == 12:
            nbt[0] += 1
        return finite
    mean, var, finite = _batch_stats(x1, A, C, B, nthreads, omp)
    _update_running(rm, rv, nbt, flags, momentum, mean, var, finite, A * B)
    for c in range(C):
        stats[0, c] = mean[c]
    _invstd_into(var, eps, x1, stats[1])
    kk, s, o = _coefficients(stats[0], stats[1], w, b, has_w, has_b, x1, B < RUN_MIN)
    _affine(x1, A, C, B, kk, s, o, y1, nthreads, omp)
    return finite


@njit(**_OPTS)
def _parts_finite(fin):
    """Whether every part of the blocked forward found its channels finite (``fin``: one
    flag per part). A count, not a flag set to True first: a literal True would be typed
    Literal[bool] and compile _finish_forward once more (see _ZERO)."""
    bad = 0
    for u in range(fin.shape[0]):
        bad += fin[u] == 0
    return bad == 0


@njit(**_OPTS)
def _running_rate(nbt, flags, momentum):
    """The running statistics' update rate: ``momentum``, or ``1 / (t + 1)`` for the
    cumulative average (flags 16, with the counter: flags 8)."""
    return 1.0 / (nbt[0] + 1) if (flags & 24) == 24 else momentum


@njit(**_OPTS)
def _running_range(rm, rv, flags, rate, mean, var, finite, n, lo, hi):
    """Channels ``lo .. hi-1`` of the running statistics move towards the batch's at ``rate``
    (flags 4), unless the batch was not finite; the stored variance is unbiased."""
    if finite and (flags & 4) != 0:
        unbias = n / (n - 1) if n > 1 else 1.0
        for c in range(lo, hi):
            rm[c] = (1.0 - rate) * np.float64(rm[c]) + rate * mean[c]
            rv[c] = (1.0 - rate) * np.float64(rv[c]) + rate * var[c] * unbias


@njit(**_OPTS)
def _update_running(rm, rv, nbt, flags, momentum, mean, var, finite, n):
    """The running statistics move towards the batch's (flags 4; 8 the counter, 16 the
    cumulative average), unless the batch was not finite."""
    rate = _running_rate(nbt, flags, momentum)
    _running_range(rm, rv, flags, rate, mean, var, finite, n, _ZERO, mean.shape[0])
    if finite and (flags & 12) == 12:
        nbt[0] += 1


@njit(**_OPTS)
def _finish_forward(stats, rm, rv, flags, rate, eps, finite, n, like, lo, hi):
    """The blocked forward's last step for channels ``lo .. hi-1``, once every block is done:
    the running statistics move (see :func:`_running_range`), then the variance the blocks
    left in ``stats[1]`` becomes ``1 / sqrt(var + eps)``."""
    _running_range(rm, rv, flags, rate, stats[0], stats[1], finite, n, lo, hi)
    v = stats[1, lo:hi]
    _invstd_into(v, eps, like, v)


@njit(**_INLINE)
def _eval_forward(x1, y1, A, C, B, rm, rv, w, b, flags, eps, nthreads, omp):
    cb = channel_block(A, C, B, x1.itemsize, 1, nthreads, 0)  # wide blocks only
    if cb > 0 and B < RUN_MIN and (nthreads == 1 or omp.size):
        # wide data: threads split the channels, and each block makes its own coefficients
        # (those of the whole tensor, expanded per column, would cost as much as the data)
        if nthreads == 1:
            _eval_blocks(x1, y1, A, C, B, cb, rm, rv, w, b, (flags & 1) != 0, (flags & 2) != 0,
                         eps, _ZERO, C)  # fmt: skip
        else:
            par = np.empty(1)  # eps, read through its address
            par[0] = eps
            blk = _block((  # _EVAL_BLOCKS_BLOCK slots
                omp[1], x1.ctypes.data, y1.ctypes.data, A, C, B, cb, rm.ctypes.data,
                rv.ctypes.data, w.ctypes.data, b.ctypes.data, flags & 3, par.ctypes.data,
                nthreads, omp[2],
            ))  # fmt: skip
            _omp_parallel(omp[0], omp[9], blk.ctypes.data, nthreads)
            _alive((blk, par))
        return
    kk, s, o = _coefficients(rm, rv, w, b, (flags & 1) != 0, (flags & 2) != 0, x1, B < RUN_MIN, eps)
    _affine(x1, A, C, B, kk, s, o, y1, nthreads, omp)


@njit(**_INLINE)
def _train_backward(g1, x1, A, C, B, stats, w, flags, d1, dw, db, nthreads, run_bytes, omp):
    has_w = (flags & 1) != 0
    cb = channel_block(A, C, B, x1.itemsize, 2, nthreads, run_bytes)
    if cb > 0 and (nthreads == 1 or omp.size):
        if nthreads == 1:
            _backward_blocks(g1, x1, d1, A, C, B, cb, stats, w, has_w, flags, dw, db, _ZERO, C)
        else:
            blk = _block((  # _BACKWARD_BLOCKS_BLOCK slots
                omp[1], g1.ctypes.data, x1.ctypes.data, d1.ctypes.data, A, C, B, cb,
                stats.ctypes.data, w.ctypes.data, flags, dw.ctypes.data, db.ctypes.data, nthreads,
                omp[2],
            ))  # fmt: skip
            _omp_parallel(omp[0], omp[8], blk.ctypes.data, nthreads)
            _alive((blk,))
        return
    mean = stats[0]
    invstd = stats[1]
    sum_dy, sum_dy_xmu = _dots(g1, x1, A, C, B, mean, nthreads, omp)
    if (flags & 2) != 0:  # dweight
        for c in range(C):
            dw[c] = sum_dy_xmu[c] * invstd[c]
    if (flags & 4) != 0:  # dbias
        for c in range(C):
            db[c] = sum_dy[c]
    if (flags & 8) != 0:  # dx
        co = _grad_coefficients(mean, invstd, w, has_w, sum_dy, sum_dy_xmu, A * B, x1, B < RUN_MIN)
        _grad(g1, x1, A, C, B, co, d1, nthreads, omp)


@njit(**_INLINE)
def _eval_backward(g1, x1, A, C, B, rm, rv, w, flags, eps, d1, dw, db, nthreads, omp):
    # evaluation mode: y = (x - rm) * invstd * w + b with constant statistics, so
    # dx = dy * w * invstd, dw = sum(dy * (x - rm)) * invstd and db = sum(dy)
    has_w = (flags & 1) != 0
    mean = np.empty(C)
    for c in range(C):
        mean[c] = rm[c]
    invstd = np.empty(C)
    _invstd_into(rv, eps, x1, invstd)
    if (flags & 6) != 0:
        sum_dy, sum_dy_xmu = _dots(g1, x1, A, C, B, mean, nthreads, omp)
        if (flags & 2) != 0:
            for c in range(C):
                dw[c] = sum_dy_xmu[c] * invstd[c]
        if (flags & 4) != 0:
            for c in range(C):
                db[c] = sum_dy[c]
    if (flags & 8) != 0:
        k = np.empty(C, g1.dtype)
        s = np.empty(C, g1.dtype)
        for c in range(C):
            k[c] = 0
            s[c] = invstd[c] * (np.float64(w[c]) if has_w else 1.0)
        _affine(g1, A, C, B, k, s, k, d1, nthreads, omp)


# --- entry points --------------------------------------------------------------------------------
# flags of train_forward: 1 weight, 2 bias, 4 running statistics, 8 num_batches_tracked,
# 16 cumulative average (momentum=None); of eval_forward: 1 weight, 2 bias; of train_backward
# and eval_backward: 1 weight, 2 want dweight, 4 want dbias, 8 want dx. run_bytes of the
# training passes: the run family's channel-block budget (channel_block; 0: the two-pass loops).


@njit(**_PARALLEL)
def train_forward_f32(
    px, py, A, C, B, pw, pb, prm, prv, pnbt, flags, momentum, eps, pstats, nthreads, run_bytes,
    pomp
):  # fmt: skip
    """Training forward: statistics, running-statistics update, ``y``; returns ``finite``.

    ``stats`` (float64, (2, C)) receives the batch mean and ``1/sqrt(var + eps)``. A non-finite
    batch leaves the running statistics and the counter untouched (the caller warns or raises).
    """
    n = A * C * B
    return _train_forward(
        carray(_f32(px), n), carray(_f32(py), n), A, C, B,
        carray(_f32(pw), C), carray(_f32(pb), C), carray(_f32(prm), C), carray(_f32(prv), C),
        carray(_i64(pnbt), 1), flags, momentum, eps, carray(_f64(pstats), (2, C)), nthreads,
        run_bytes, _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def train_forward_f64(
    px, py, A, C, B, pw, pb, prm, prv, pnbt, flags, momentum, eps, pstats, nthreads, run_bytes,
    pomp
):  # fmt: skip
    """:func:`train_forward_f32` for float64 data."""
    n = A * C * B
    return _train_forward(
        carray(_f64(px), n), carray(_f64(py), n), A, C, B,
        carray(_f64(pw), C), carray(_f64(pb), C), carray(_f64(prm), C), carray(_f64(prv), C),
        carray(_i64(pnbt), 1), flags, momentum, eps, carray(_f64(pstats), (2, C)), nthreads,
        run_bytes, _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def eval_forward_f32(px, py, A, C, B, prm, prv, pw, pb, flags, eps, nthreads, pomp):
    """``y = (x - running_mean) / sqrt(running_var + eps) * w + b`` in one pass."""
    n = A * C * B
    _eval_forward(
        carray(_f32(px), n), carray(_f32(py), n), A, C, B, carray(_f32(prm), C),
        carray(_f32(prv), C), carray(_f32(pw), C), carray(_f32(pb), C), flags, eps, nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def eval_forward_f64(px, py, A, C, B, prm, prv, pw, pb, flags, eps, nthreads, pomp):
    """:func:`eval_forward_f32` for float64 data."""
    n = A * C * B
    _eval_forward(
        carray(_f64(px), n), carray(_f64(py), n), A, C, B, carray(_f64(prm), C),
        carray(_f64(prv), C), carray(_f64(pw), C), carray(_f64(pb), C), flags, eps, nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def train_backward_f32(
    pdy, px, A, C, B, pstats, pw, flags, pdx, pdw, pdb, nthreads, run_bytes, pomp
):
    """Backward of training-mode batch norm: both reductions, then ``dx`` (if asked), in one
    call; ``dweight``/``dbias`` are written in the data's dtype."""
    n = A * C * B
    _train_backward(
        carray(_f32(pdy), n), carray(_f32(px), n), A, C, B, carray(_f64(pstats), (2, C)),
        carray(_f32(pw), C), flags, carray(_f32(pdx), n), carray(_f32(pdw), C),
        carray(_f32(pdb), C), nthreads, run_bytes,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def train_backward_f64(
    pdy, px, A, C, B, pstats, pw, flags, pdx, pdw, pdb, nthreads, run_bytes, pomp
):
    """:func:`train_backward_f32` for float64 data."""
    n = A * C * B
    _train_backward(
        carray(_f64(pdy), n), carray(_f64(px), n), A, C, B, carray(_f64(pstats), (2, C)),
        carray(_f64(pw), C), flags, carray(_f64(pdx), n), carray(_f64(pdw), C),
        carray(_f64(pdb), C), nthreads, run_bytes,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def eval_backward_f32(pdy, px, A, C, B, prm, prv, pw, flags, eps, pdx, pdw, pdb, nthreads, pomp):
    """Backward of evaluation-mode batch norm (constant statistics): ``dx``, ``dweight`` and
    ``dbias`` as asked by ``flags``, in the data's dtype."""
    n = A * C * B
    _eval_backward(
        carray(_f32(pdy), n), carray(_f32(px), n), A, C, B, carray(_f32(prm), C),
        carray(_f32(prv), C), carray(_f32(pw), C), flags, eps, carray(_f32(pdx), n),
        carray(_f32(pdw), C), carray(_f32(pdb), C), nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def eval_backward_f64(pdy, px, A, C, B, prm, prv, pw, flags, eps, pdx, pdw, pdb, nthreads, pomp):
    """:func:`eval_backward_f32` for float64 data."""
    n = A * C * B
    _eval_backward(
        carray(_f64(pdy), n), carray(_f64(px), n), A, C, B, carray(_f64(prm), C),
        carray(_f64(prv), C), carray(_f64(pw), C), flags, eps, carray(_f64(pdx), n),
        carray(_f64(pdw), C), carray(_f64(pdb), C), nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_INLINE)
def _update_from_batch(mean, invstd, rm, rv, nbt, flags, momentum, eps, n, max_ratio):
    """Move the running statistics towards a batch's, given its mean and ``1/sqrt(var + eps)``
    as another kernel computed them; 0 if done, 1 if the batch is non-finite, 2 if some
    channel's ``|mean| * invstd`` exceeds ``max_ratio`` (nothing changes in both cases)."""
    C = mean.shape[0]
    for c in range(C):
        m = np.float64(mean[c])
        s = np.float64(invstd[c])
        if not (np.isfinite(m) and np.isfinite(s)):
            return 1
        if abs(m) * s > max_ratio:
            return 2
    if (flags & 1) != 0:
        rate = 1.0 / (nbt[0] + 1) if (flags & 6) == 6 else momentum
        unbias = n / (n - 1) if n > 1 else 1.0
        for c in range(C):
            s = np.float64(invstd[c])
            var = max(1.0 / (s * s) - eps, 0.0)
            rm[c] = (1.0 - rate) * np.float64(rm[c]) + rate * np.float64(mean[c])
            rv[c] = (1.0 - rate) * np.float64(rv[c]) + rate * var * unbias
        if (flags & 2) != 0:
            nbt[0] += 1
    return 0


@njit(**_OPTS)
def update_from_batch_f32(pmean, pinvstd, C, prm, prv, pnbt, flags, momentum, eps, n, max_ratio):
    """:func:`_update_from_batch` for float32 statistics and buffers. ``flags``: 1 running
    statistics given, 2 ``num_batches_tracked`` given, 4 cumulative average."""
    return _update_from_batch(
        carray(_f32(pmean), C), carray(_f32(pinvstd), C), carray(_f32(prm), C),
        carray(_f32(prv), C), carray(_i64(pnbt), 1), flags, momentum, eps, n, max_ratio,
    )  # fmt: skip


@njit(**_OPTS)
def update_from_batch_f64(pmean, pinvstd, C, prm, prv, pnbt, flags, momentum, eps, n, max_ratio):
    """:func:`update_from_batch_f32` for float64."""
    return _update_from_batch(
        carray(_f64(pmean), C), carray(_f64(pinvstd), C), carray(_f64(prm), C),
        carray(_f64(prv), C), carray(_i64(pnbt), 1), flags, momentum, eps, n, max_ratio,
    )  # fmt: skip


# The four steps one by one (SyncBatchNorm and the remedies call them with collectives or their
# own math in between). Per-channel inputs and outputs are float64 (C,) or (2, C) buffers.


@njit(**_INLINE)
def _statistics(x1, A, C, B, out, nthreads, omp):
    mean, var, _finite = _batch_stats(x1, A, C, B, nthreads, omp)
    for c in range(C):
        out[0, c] = mean[c]
        out[1, c] = var[c]


@njit(**_PARALLEL)
def statistics_f32(px, A, C, B, pout, nthreads, pomp):
    """Per-channel mean and biased variance into ``out`` (float64, (2, C))."""
    _statistics(
        carray(_f32(px), A * C * B), A, C, B, carray(_f64(pout), (2, C)), nthreads, _table(pomp)
    )


@njit(**_PARALLEL)
def statistics_f64(px, A, C, B, pout, nthreads, pomp):
    """:func:`statistics_f32` for float64 data."""
    _statistics(
        carray(_f64(px), A * C * B), A, C, B, carray(_f64(pout), (2, C)), nthreads, _table(pomp)
    )


@njit(**_INLINE)
def _transform(x1, y1, A, C, B, mean, invstd, w, b, flags, nthreads, omp):
    kk, s, o = _coefficients(
        mean, invstd, w, b, (flags & 1) != 0, (flags & 2) != 0, x1, B < RUN_MIN
    )
    _affine(x1, A, C, B, kk, s, o, y1, nthreads, omp)


@njit(**_PARALLEL)
def transform_f32(px, py, A, C, B, pmean, pinvstd, pw, pb, flags, nthreads, pomp):
    """``y = (x - mean) * invstd * w + b`` (float64 per-channel inputs; flags 1 w, 2 b)."""
    n = A * C * B
    _transform(
        carray(_f32(px), n), carray(_f32(py), n), A, C, B, carray(_f64(pmean), C),
        carray(_f64(pinvstd), C), carray(_f64(pw), C), carray(_f64(pb), C), flags, nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def transform_f64(px, py, A, C, B, pmean, pinvstd, pw, pb, flags, nthreads, pomp):
    """:func:`transform_f32` for float64 data."""
    n = A * C * B
    _transform(
        carray(_f64(px), n), carray(_f64(py), n), A, C, B, carray(_f64(pmean), C),
        carray(_f64(pinvstd), C), carray(_f64(pw), C), carray(_f64(pb), C), flags, nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_INLINE)
def _backward_reduce(g1, x1, A, C, B, mean, out, nthreads, omp):
    s1, s2 = _dots(g1, x1, A, C, B, mean, nthreads, omp)
    for c in range(C):
        out[0, c] = s1[c]
        out[1, c] = s2[c]


@njit(**_PARALLEL)
def backward_reduce_f32(pdy, px, A, C, B, pmean, pout, nthreads, pomp):
    """``(sum dy, sum dy * (x - mean))`` per channel into ``out`` (float64, (2, C))."""
    n = A * C * B
    _backward_reduce(
        carray(_f32(pdy), n), carray(_f32(px), n), A, C, B, carray(_f64(pmean), C),
        carray(_f64(pout), (2, C)), nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def backward_reduce_f64(pdy, px, A, C, B, pmean, pout, nthreads, pomp):
    """:func:`backward_reduce_f32` for float64 data."""
    n = A * C * B
    _backward_reduce(
        carray(_f64(pdy), n), carray(_f64(px), n), A, C, B, carray(_f64(pmean), C),
        carray(_f64(pout), (2, C)), nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_INLINE)
def _backward_elementwise(g1, x1, A, C, B, mean, invstd, w, flags, sums, count, d1, nthreads, omp):
    co = _grad_coefficients(
        mean, invstd, w, (flags & 1) != 0, sums[0], sums[1], count, x1, B < RUN_MIN
    )
    _grad(g1, x1, A, C, B, co, d1, nthreads, omp)


@njit(**_PARALLEL)
def backward_elementwise_f32(
    pdy, px, A, C, B, pmean, pinvstd, pw, flags, psums, count, pdx, nthreads, pomp
):
    """The input gradient from :func:`backward_reduce_f32`'s sums over ``count`` values per
    channel (all processes' count under SyncBatchNorm)."""
    n = A * C * B
    _backward_elementwise(
        carray(_f32(pdy), n), carray(_f32(px), n), A, C, B, carray(_f64(pmean), C),
        carray(_f64(pinvstd), C), carray(_f64(pw), C), flags, carray(_f64(psums), (2, C)),
        count, carray(_f32(pdx), n), nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def backward_elementwise_f64(
    pdy, px, A, C, B, pmean, pinvstd, pw, flags, psums, count, pdx, nthreads, pomp
):
    """:func:`backward_elementwise_f32` for float64 data."""
    n = A * C * B
    _backward_elementwise(
        carray(_f64(pdy), n), carray(_f64(px), n), A, C, B, carray(_f64(pmean), C),
        carray(_f64(pinvstd), C), carray(_f64(pw), C), flags, carray(_f64(psums), (2, C)),
        count, carray(_f64(pdx), n), nthreads,
        _table(pomp),
    )  # fmt: skip


@njit(**_PARALLEL)
def start_pool(n):
    """A trivial parallel loop: its first launch starts numba's thread pool."""
    out = np.empty(n)
    for i in prange(n):
        out[i] = i
    return out
