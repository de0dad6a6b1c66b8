"""CPU kernels for batch normalization, and the choice between them.

Every backend implements the same four steps (the split In-Place ABN's backend API uses):

``statistics(x) -> (mean, var)``
    per-channel mean and biased variance, float64 tensors of shape (C,).
``transform(x, mean, invstd, weight, bias) -> y``
    ``(x - mean) * invstd * weight + bias`` in x's dtype and memory layout.
``backward_reduce(dy, x, mean) -> (sum_dy, sum_dy_xmu)``
    the two per-channel reductions the backward needs, float64.
``backward_elementwise(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count) -> dx``
    the input gradient of training-mode batch norm.

Synchronizing across processes is then one collective between ``statistics`` and ``transform``
and one between the two backward steps. Inputs reach a backend non-empty, with rank >= 2 and in
contiguous or channels_last layout (:func:`as_supported_layout`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import cxx_eval, torch_ops

__all__ = ["BACKENDS", "Backend", "as_supported_layout", "select_backend", "use_backend"]


@dataclass(frozen=True)
class Backend:
    """A set of the four batch-norm steps (see the module docstring for their contracts)."""

    name: str
    statistics: Callable[[Tensor], tuple[Tensor, Tensor]]
    transform: Callable[..., Tensor]
    backward_reduce: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    backward_elementwise: Callable[..., Tensor]


TORCH_OPS = Backend(
    name="torch_ops",
    statistics=torch_ops.statistics,
    transform=torch_ops.transform,
    backward_reduce=torch_ops.backward_reduce,
    backward_elementwise=torch_ops.backward_elementwise,
)

BACKENDS: dict[str, Backend] = {TORCH_OPS.name: TORCH_OPS}

# numba's compiled loops (kernels/numba_cpu.py) are the default on CPU. The import is guarded so
# bnorm still works, on torch ops, where numba is not installed (a platform without its wheels).
try:
    from . import numba_cpu
except ImportError:  # pragma: no cover - numba is a declared dependency
    numba_cpu = None  # type: ignore[assignment]
    NUMBA: Backend | None = None
else:
    NUMBA = Backend(
        name="numba",
        statistics=numba_cpu.statistics,
        transform=numba_cpu.transform,
        backward_reduce=numba_cpu.backward_reduce,
        backward_elementwise=numba_cpu.backward_elementwise,
    )
    BACKENDS[NUMBA.name] = NUMBA

_forced: Backend | None = None


def select_backend(x: Tensor) -> Backend:
    """The backend for a CPU tensor ``x`` (already in a supported layout)."""
    if _forced is not None:
        return _forced
    if NUMBA is not None and numba_cpu.supports(x):
        return NUMBA
    return TORCH_OPS


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Force one backend inside a ``with`` block (tests and benchmarks compare them this way)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown batch-norm backend {name!r}; known: {sorted(BACKENDS)}")
    previous, _forced = _forced, BACKENDS[name]
    cxx_eval.suspend()  # the layers' compiled evaluation entry is numba's kernel
    try:
        yield _forced
    finally:
        _forced = previous
        cxx_eval.resume()


def as_supported_layout(x: Tensor) -> Tensor:
    """``x`` itself if contiguous or channels_last, else a contiguous copy (as torch does)."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()
