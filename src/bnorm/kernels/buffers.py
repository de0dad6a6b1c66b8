"""A cache of output buffers for the CPU kernels: large outputs reuse memory instead of faulting.

Why: every training step allocates the same large outputs again (``y`` in the forward, ``dx``
in the backward). PyTorch's CPU allocator is the C library's ``malloc``, which hands blocks of
this size back to the operating system when they are freed; the next step's allocation then
takes fresh pages, and the kernel zeroes each 4 KiB page on first touch. On the 2-core virtual
machines this project measures on, those page faults cost about as much as the batch norm
itself, and their cost varies from step to step. bnorm's kernels therefore write their large
outputs into buffers it recycles, the way PyTorch's CUDA caching allocator does for GPU memory.

How: a buffer is a NumPy byte array; the tensor handed out is ``torch.from_numpy`` of a typed
view of it, so the tensor's storage holds the view. When the last tensor or view using that
storage is gone, the view dies, a weak-reference callback returns the buffer, and the next
request of the same size reuses it. The test is at the level of the storage, so a buffer is
never reused while anything (a view, autograd, ``.numpy()``) can still reach it.

Limits: outputs smaller than :data:`MIN_BYTES` come from ``torch.empty`` (``malloc`` keeps
small blocks). At most ``max_bytes`` of buffers not in use are kept (see
:func:`set_buffer_cache`); a buffer returned beyond that goes back to ``malloc``. The tensors
handed out behave like any CPU tensor except that their storage cannot be resized beyond the
buffer (``y.resize_(larger)`` raises), as for any tensor made by ``torch.from_numpy``.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MIN_BYTES",
    "BufferCacheInfo",
    "buffer_cache_info",
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

    max_bytes: int  #: the most memory kept in buffers not in use
    cached_bytes: int  #: memory in buffers not in use, ready for reuse
    in_use_bytes: int  #: memory in buffers held by live tensors
    hits: int  #: requests served by a cached buffer
    misses: int  #: requests that allocated a new buffer


class _Cache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        # id(weakref) -> (weakref, buffer) for buffers in use; the weakref must stay alive for
        # its callback to run
        self._live: dict[int, tuple[weakref.ref, np.ndarray]] = {}
        # buffers whose tensors died; the callback only appends here (it can run anywhere,
        # even inside this class's own methods, so it takes no lock)
        self._returned: collections.deque[np.ndarray] = collections.deque()
        self.hits = 0
        self.misses = 0

    def _release(self, ref: weakref.ref) -> None:
        entry = self._live.pop(id(ref), None)
        if entry is not None:
            self._returned.append(entry[1])

    def _drain(self) -> None:
        while self._returned:
            buf = self._returned.popleft()
            if self._free_bytes + buf.nbytes <= self.max_bytes:
                self._free.setdefault(buf.nbytes, []).append(buf)
                self._free_bytes += buf.nbytes

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            if self._returned:
                self._drain()
            bufs = self._free.get(nbytes)
            if bufs:
                self.hits += 1
                self._free_bytes -= nbytes
                return bufs.pop()
            self.misses += 1
        raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % _ALIGN
        return raw[start : start + nbytes]

    def clear(self) -> None:
        with self._lock:
            self._drain()
            self._free.clear()
            self._free_bytes = 0

    def info(self) -> BufferCacheInfo:
        with self._lock:
            self._drain()
            in_use = sum(buf.nbytes for _ref, buf in list(self._live.values()))
            return BufferCacheInfo(self.max_bytes, self._free_bytes, in_use, self.hits, self.misses)


_cache = _Cache(_default_max_bytes())


def empty_like(x: Tensor) -> Tensor:
    """An uninitialized tensor of x's shape, dtype and strides (x is dense: contiguous or
    channels_last(_3d)), float32 or float64; from the cache from :data:`MIN_BYTES` on."""
    itemsize = x.element_size()
    nbytes = x.numel() * itemsize
    dtype = _NUMPY.get(x.dtype)
    if nbytes < MIN_BYTES or dtype is None or _cache.max_bytes <= 0:
        return torch.empty_like(x)
    buf = _cache.take(nbytes)
    # one view with x's shape and strides: the tensor made from it has x's layout, and the
    # view is what the tensor's storage holds, so its death says the buffer is free
    strides = None if x.is_contiguous() else tuple(s * itemsize for s in x.stride())
    view = np.ndarray(tuple(x.shape), dtype, buf, 0, strides)
    ref = weakref.ref(view, _cache._release)
    _cache._live[id(ref)] = (ref, buf)
    return torch.from_numpy(view)


def set_buffer_cache(max_bytes: int) -> None:
    """Keep at most ``max_bytes`` of output buffers not in use (0 turns the cache off).

    The default is 1 GiB, or 1/16 of the machine's memory if that is less; the environment
    variable ``BNORM_BUFFER_CACHE_MB`` sets it at import. Cached buffers are freed.
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    _cache.max_bytes = max_bytes
    _cache.clear()


def empty_buffer_cache() -> None:
    """Return every cached buffer not in use to ``malloc`` (buffers in use are not touched)."""
    _cache.clear()


def buffer_cache_info() -> BufferCacheInfo:
    """How much memory the output cache holds and how often it was reused."""
    return _cache.info()
