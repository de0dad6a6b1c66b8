"""The exceptions and warnings bnorm raises.

Each error class also derives from the class PyTorch raises for the same mistake, so code
written for ``torch.nn.BatchNorm*`` that catches ``RuntimeError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "BatchNormDtypeError",
    "BatchNormShapeError",
    "ExtensionWarning",
    "NonFiniteBatchError",
    "NonFiniteBatchWarning",
    "SyncBatchNormError",
]


class BatchNormShapeError(ValueError, RuntimeError):
    """The input's shape does not fit the layer (torch raises RuntimeError for some of these)."""


class BatchNormDtypeError(TypeError, RuntimeError):
    """The input's dtype cannot be served by the layer's parameters and buffers."""


class NonFiniteBatchWarning(RuntimeWarning):
    """A training batch held NaN or Inf; the running statistics were not updated."""


class NonFiniteBatchError(FloatingPointError):
    """A training batch held NaN or Inf, and the layer was set to ``on_nonfinite="raise"``."""


class SyncBatchNormError(RuntimeError):
    """A synchronized batch norm could not complete its collective on this rank.

    Raised when another rank died or did not reach the same call within the timeout, or when
    ranks are out of step (a rank skipped, repeated or added a call, or called a layer of
    another width or dtype: raised on every rank that takes part). The message names the
    layer, this rank, the call counter and what happened. The running statistics are left as
    they were before the failed call.

    Recovery: do not use the process group again (the other ranks may be at another call);
    call :func:`torch.distributed.destroy_process_group` and exit (a launcher such as torchrun
    restarts the job) or initialize a new group. This returns at once: each collective of the
    layer runs with the layer's timeout as its own, so none is left waiting on the group, and
    the process exits without waiting for the missing rank.
    """


class ExtensionWarning(UserWarning):
    """bnorm's C++ operators are not built; the layers run on the composite path (pure torch
    ops: the same results, slower). Issued once, at import."""
