"""A cache of output buffers for the CPU kernels: large outputs reuse memory instead of faulting.

Why: every training step allocates the same large outputs again (``y`` in the forward, ``dx``
in the backward). PyTorch's CPU allocator is the C library's ``malloc``, which hands blocks of
this size back to the operating system when they are freed; the next step's allocation then
takes fresh pages, and the kernel zeroes each 4 KiB page on first touch. On the 2-core virtual
machines this project measures on, those page faults cost about as much as the batch norm
itself, and their cost varies from step to step. bnorm's kernels therefore write their large
outputs into buffers it recycles, the way PyTorch's CUDA caching allocator does for GPU memory.

How: a buffer is a NumPy byte array, and the cache holds one typed view of it per layout
(shape, strides, dtype). The tensor handed out is ``torch.from_numpy`` of that view, so the
tensor's storage holds a reference to the view until the last tensor or view using that storage
is gone. A view whose only references are the cache's own is idle: the next request for its
layout reuses it. The test reads the view's reference count, so a buffer is never reused while
anything (a view, autograd, ``.numpy()``, a storage object) can still reach it, and a request
costs one dictionary lookup, one count and ``torch.from_numpy``. Measured on a 1 MB output:
1.4 times a ``torch.empty_like``, where the first design (a new NumPy view and a weak
reference per request, returned by the reference's callback) cost 3 times.

Limits: outputs smaller than :data:`MIN_BYTES` come from ``torch.empty`` (``malloc`` keeps
small blocks). The cache holds at most ``max_bytes`` of buffers, idle or in use (see
:func:`set_buffer_cache`): when a new one would not fit, idle buffers (of other layouts: one of
the same layout would have been reused) are freed first, and if it still does not fit the
output comes from ``torch.empty``. The tensors handed
out behave like any CPU tensor except that their storage cannot be resized beyond the buffer
(``y.resize_(larger)`` raises), as for any tensor made by ``torch.from_numpy``.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MIN_BYTES",
    "BufferCacheInfo",
    "buffer_cache_info",
    "empty",
    "empty_buffer_cache",
    "empty_like",
    "set_buffer_cache",
]

#: outputs smaller than this come from torch.empty (malloc serves them without page faults)
MIN_BYTES = 1 << 18

_ALIGN = 64  # bytes: a cache line, and one AVX-512 vector

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _default_max_bytes() -> int:
    """``BNORM_BUFFER_CACHE_MB`` if set, else 1 GiB or 1/16 of the machine's memory if less."""
    env = os.environ.get("BNORM_BUFFER_CACHE_MB")
    if env is not None:
        try:
            return max(0, int(float(env) * 2**20))
        except ValueError as err:
            raise ValueError(f"BNORM_BUFFER_CACHE_MB must be a number of MiB, got {env!r}") from err
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        total = 16 * 2**30
    return min(2**30, total // 16)


@dataclass(frozen=True)
class BufferCacheInfo:
    """What :func:`buffer_cache_info` reports."""

    max_bytes: int  #: the most memory the cache holds in buffers, idle or in use
    cached_bytes: int  #: memory in idle buffers, ready for reuse
    in_use_bytes: int  #: memory in buffers held by live tensors
    hits: int  #: requests served by an idle buffer of the same layout
    misses: int  #: other requests (a new buffer, or torch.empty beyond the cap)


def _refs_of_loop_variable(views: list[np.ndarray]) -> int:
    """The reference count a view seen by ``for v in views`` reports when nothing but the list
    holds it: measured once, with the loop :func:`empty_like` and the cache's methods use,
    because the count a loop variable adds is an interpreter detail."""
    for v in views:
        return sys.getrefcount(v)
    raise AssertionError("unreachable: called with one view")


#: the reference count of an idle view in the cache's loops (the list's reference, the loop
#: variable's and getrefcount's argument's, on CPython 3.11)
_IDLE_REFS = _refs_of_loop_variable([np.empty(0)])


_Key = tuple[torch.Size, tuple[int, ...], torch.dtype]


class _Cache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # (shape, strides, dtype) -> the views of that layout the cache holds, idle or in use
        self._views: dict[_Key, list[np.ndarray]] = {}
        self._held_bytes = 0  # all buffers the cache holds
        self.hits = 0
        self.misses = 0

    def new(self, x: Tensor, key: _Key) -> Tensor | None:
        """A tensor of x's layout over a new buffer (x may be a meta tensor); None beyond the
        cap."""
        with self._lock:
            self.misses += 1
            nbytes = x.nbytes
            if self._held_bytes + nbytes > self.max_bytes:
                # Idle buffers of other layouts make room. They are dropped, never viewed
                # anew: a taker on the lock-free path may hold one, and its tensor then keeps
                # that memory to itself.
                self._free_idle(self._held_bytes + nbytes - self.max_bytes)
                if self._held_bytes + nbytes > self.max_bytes:
                    return None
            raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
            start = -raw.ctypes.data % _ALIGN
            buf = raw[start : start + nbytes]
            self._held_bytes += nbytes
            # x is dense (contiguous or channels_last), so a view with x's shape and strides
            # covers the buffer exactly
            strides = tuple(s * x.element_size() for s in x.stride())
            view = np.ndarray(tuple(x.shape), _NUMPY[x.dtype], buf, 0, strides)
            self._views.setdefault(key, []).append(view)
            return torch.from_numpy(view)

    def _free_idle(self, nbytes: int | None) -> None:
        """Drop idle buffers until ``nbytes`` are freed (all of them for None)."""
        freed = 0
        for key in list(self._views):
            views = self._views[key]
            keep = []
            for v in views:
                if sys.getrefcount(v) == _IDLE_REFS and (nbytes is None or freed < nbytes):
                    freed += v.nbytes
                else:
                    keep.append(v)
            if keep:
                self._views[key] = keep
            else:
                del self._views[key]
        self._held_bytes -= freed

    def clear(self, in_use_too: bool = False) -> None:
        """Free idle buffers; with ``in_use_too`` also stop tracking those in use (their tensors
        then own them, and free them when they die)."""
        with self._lock:
            if in_use_too:
                self._views.clear()
                self._held_bytes = 0
            else:
                self._free_idle(None)

    def info(self) -> BufferCacheInfo:
        with self._lock:
            idle = 0
            for views in self._views.values():
                for v in views:
                    if sys.getrefcount(v) == _IDLE_REFS:
                        idle += v.nbytes
            return BufferCacheInfo(
                self.max_bytes, idle, self._held_bytes - idle, self.hits, self.misses
            )


_cache = _Cache(_default_max_bytes())


def empty_like(x: Tensor) -> Tensor:
    """An uninitialized tensor of x's shape, dtype and strides (x is dense: contiguous or
    channels_last(_3d)), float32 or float64; from the cache from :data:`MIN_BYTES` on."""
    if x.nbytes < MIN_BYTES:
        return torch.empty_like(x)
    key = (x.shape, x.stride(), x.dtype)
    views = _cache._views.get(key)
    if views is not None:
        # No lock on this path (it would cost a quarter of it). Two threads cannot both take
        # an idle view: while one counts, its loop variable holds the view, so the other's
        # count sees it taken. The count after the tensor is made does not rely on that
        # detail: a taker keeps the buffer only if no reference but its own has appeared.
        for v in views:
            if sys.getrefcount(v) == _IDLE_REFS:
                y = torch.from_numpy(v)
                if sys.getrefcount(v) == _IDLE_REFS + 1:
                    _cache.hits += 1  # a statistic: racing threads may lose a count
                    return y
                del y
    if _cache.max_bytes > 0 and x.dtype in _NUMPY:
        y = _cache.new(x, key)
        if y is not None:
            return y
    return torch.empty_like(x)


def empty(n: int, dtype: torch.dtype) -> Tensor:
    """An uninitialized 1-D tensor of ``n`` values of ``dtype`` (float32 or float64), from the
    cache from :data:`MIN_BYTES` on: per-channel results of very wide inputs (the saved
    statistics, the parameters' gradients) are as large as the data there, and would fault
    their pages at every step too."""
    if n * (4 if dtype is torch.float32 else 8) < MIN_BYTES or dtype not in _NUMPY:
        return torch.empty(n, dtype=dtype)
    y = empty_like(torch.empty(n, dtype=dtype, device="meta"))
    return y if y.device.type == "cpu" else torch.empty(n, dtype=dtype)


def set_buffer_cache(max_bytes: int) -> None:
    """Keep at most ``max_bytes`` of output buffers not in use (0 turns the cache off).

    The cap counts buffers idle and in use; outputs that would go beyond it come from
    ``torch.empty``. The default is 1 GiB, or 1/16 of the machine's memory if that is less; the
    environment variable ``BNORM_BUFFER_CACHE_MB`` sets it at import. Idle buffers are freed,
    and those in use are left to their tensors, which free them when they die.
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    _cache.max_bytes = max_bytes
    _cache.clear(in_use_too=True)


def empty_buffer_cache() -> None:
    """Return every cached buffer not in use to ``malloc`` (buffers in use are not touched)."""
    _cache.clear()


def buffer_cache_info() -> BufferCacheInfo:
    """How much memory the output cache holds and how often it was reused."""
    return _cache.info()
