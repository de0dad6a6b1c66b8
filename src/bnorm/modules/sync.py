r"""Synchronized batch normalization: statistics pooled over the processes of a group.

:class:`SyncBatchNorm` normalizes each rank's slice of a global batch with the statistics of
the whole global batch, so data-parallel training with k processes of batch b computes what a
single process would compute on the batch k·b. Unlike :class:`torch.nn.SyncBatchNorm` it works
on CPU tensors with the gloo backend (torch's raises "SyncBatchNorm expected input tensor to be
on GPU ..."), handles ranks with different or empty batches, and turns a dead or out-of-step
rank into a :class:`~bnorm.distributed.SyncBatchNormError` within a timeout instead of a hang.
The math and the collectives are in :mod:`bnorm.distributed`; the computation is bnorm's
step operators (:mod:`bnorm.ops`), with one collective after the statistics and one after the
backward reductions.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _checks, ops
from .. import distributed as _dist
from .._remedies_common import as_supported_layout, layout_of
from ..functional import update_running_stats
from . import batchnorm as _bn

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


_created = 0


def _next_sync_id() -> int:
    """The creation order of SyncBatchNorm layers in this process (see ``sync_id``)."""
    global _created
    _created += 1
    return _created - 1


def _as_timedelta(timeout: datetime.timedelta | float | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if not timeout > 0:
        raise ValueError(f"SyncBatchNorm: timeout must be positive seconds, got {timeout}")
    return datetime.timedelta(seconds=float(timeout))


class SyncBatchNorm(_bn._BatchNormBase, _BatchNorm):
    r"""Batch normalization over the global batch of all processes in a group; a drop-in for
    :class:`torch.nn.SyncBatchNorm` that also works on CPU with gloo.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    where, in training under torch.distributed, mean and (biased) variance are taken per
    channel over the union of every rank's batch (exactly: per-rank counts, means and sums of
    squared deviations are gathered in one collective and merged in float64, see
    :mod:`bnorm.distributed`). The backward sums its two per-channel reductions over ranks in one
    more collective, so each rank's input gradient is that of single-process batch norm over
    the global batch. Parameter gradients stay local (this rank's share); DDP's all-reduce adds
    them up, as with torch's SyncBatchNorm.

    Shape: (N, C, \*) with any number of trailing dims (rank >= 2); the output has the input's
    shape and memory format (channels_last stays channels_last). N may differ between ranks
    and may be 0 on some: an empty rank contributes nothing to the statistics, gets an empty
    output, and still takes part in both collectives.

    Modes:

    - training, distributed, this rank in ``process_group`` with >= 2 members: synchronized.
      The running statistics are updated on every rank with the global mean and the unbiased
      global variance (global count n: ``n/(n-1)``), so they stay equal across ranks;
      ``num_batches_tracked`` advances by one. If the global statistics hold NaN/Inf, no rank
      updates (``on_nonfinite``, as in :class:`bnorm.BatchNorm2d`). Fewer than 2 values per
      channel over the whole group raise ValueError on every rank.
    - otherwise (not distributed, one process, rank outside ``process_group``, or eval):
      plain local batch norm, exactly :class:`bnorm.BatchNorm2d`'s computation. Eval uses the
      running statistics; with ``track_running_stats=False`` eval uses the local batch's
      statistics unsynchronized, as torch's SyncBatchNorm does.

    Rules for the synchronized case (as for any collective): every rank of the group calls the
    layer the same number of times, and when the output takes part in autograd every rank runs
    the backward through it (call ``backward`` on a loss that depends on the output, even on an
    empty rank: e.g. ``out.sum() * 0`` works). Ranks disagreeing on whether a backward will
    run are detected in the forward. Before each collective, the ranks check that they are at
    the same layer and call, with the same width and dtype (one small fixed-size collective),
    so a rank that skips, repeats or adds a call makes every rank raise. A broken rule, a dead
    rank or a rank that does not arrive within ``timeout`` raises
    :class:`~bnorm.distributed.SyncBatchNormError` naming the layer, the rank and the call; the
    running statistics are then unchanged.

    Recovery from :class:`~bnorm.distributed.SyncBatchNormError`: call
    :func:`torch.distributed.destroy_process_group` and exit, or initialize a new group; do not
    run collectives on the old one. It returns at once, and the process exits without waiting
    for the missing rank, because ``timeout`` is each collective's own timeout (the backend
    fails the operation, none stays posted). With ``timeout=None`` the group's timeout plays
    that part, so the error itself takes that long.

    Conventions: ``momentum`` is PyTorch's update rate (``None``: cumulative average); the
    running variance is unbiased; eps defaults to 1e-5.

    ``isinstance(layer, torch.nn.SyncBatchNorm)`` is False on purpose:
    DistributedDataParallel refuses CPU models holding torch's SyncBatchNorm class. The
    parameters, buffers and ``state_dict`` keys are those of torch's SyncBatchNorm and
    BatchNorm layers, so checkpoints load either way.

    Args:
        num_features: the number of channels ``C``.
        eps, momentum, affine, track_running_stats, device, dtype: as
            :class:`torch.nn.BatchNorm2d`.
        process_group: the group whose ranks share statistics (default: the whole world).
        bias: with ``affine``, whether to learn ``bias`` (keyword only).
        on_nonfinite: ``"warn"`` or ``"raise"`` for a global batch holding NaN/Inf.
        timeout: seconds (or a timedelta) each collective of this layer may wait for the other
            ranks before it fails and the layer raises; ``None`` (default) uses the process
            group's timeout (``init_process_group(timeout=...)``, 30 minutes by default for
            gloo).

    Attributes (not in the state_dict):
        sync_id: this layer's identity in the collectives, the order in which SyncBatchNorm
            layers were created (or converted) in this process; it is the same on every rank
            when every rank builds the same model in the same order, and lets ranks detect
            that their calls paired different layers (a rank skipped a layer). Set it by hand
            if ranks create layers in different orders.
        timeout: as the argument (a timedelta or None).
    """

    _layout = "(N, C, *)"  # any rank >= 2 (_ranks stays empty)

    _bnorm_defaults: ClassVar[dict[str, object]] = {
        **_bn._BatchNormBase._bnorm_defaults,
        "timeout": None,
    }

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        on_nonfinite: str = "warn",
        timeout: datetime.timedelta | float | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            on_nonfinite=on_nonfinite,
        )
        self.process_group = process_group
        self.timeout = _as_timedelta(timeout)
        self._sync_calls = 0
        self.sync_id = _next_sync_id()

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self._layer_name()}: expected at least 2D input (N, C, *) "
                f"(got {input.dim()}D input of shape {_checks.shape_text(input)})"
            )

    def forward(self, input: Tensor) -> Tensor:
        group = _dist.sync_group(self.process_group) if self.training else False
        if group is False:
            return super().forward(input)  # local batch norm (bnorm's _BatchNormBase)
        # The batch-size rule applies to the global batch, checked after the gather.
        self._check_input(input, use_batch_stats=False)
        return self._sync_forward(input, group)

    def _sync_forward(self, input: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        name = self._layer_name()
        x = as_supported_layout(input)
        channels = x.shape[1]
        count = x.numel() // channels if channels else 0
        if count > 0:
            with torch.no_grad():
                mean, var = ops.statistics(x.detach())
        else:
            mean = var = torch.zeros(channels, dtype=torch.float64, device=x.device)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias)
        )
        tag = (self.sync_id, self._sync_calls + 1)
        merged = _dist.gather_statistics(
            mean,
            var,
            count,
            needs_grad=needs_grad,
            tag=tag,
            group=group,
            timeout=self.timeout,
            layer=name,
            dtype=x.dtype,
        )
        self._sync_calls = tag[1]
        if merged.count == 1:
            raise ValueError(
                f"{name}: Expected more than 1 value per channel when training, got 1 value "
                f"per channel over the whole process group (this rank's input: "
                f"{_checks.shape_text(input)})"
            )
        if self.track_running_stats:
            if merged.count > 0:
                update_running_stats(
                    self.running_mean,
                    self.running_var,
                    merged.mean,
                    merged.var,
                    merged.count,
                    self.momentum,
                    self.num_batches_tracked,
                    self.on_nonfinite,
                    name,
                )
            elif self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)  # an empty global batch counts, as in torch
        invstd = torch.rsqrt(merged.var + self.eps)
        if merged.needs_grad:
            return _SyncBatchNormFunction.apply(
                x,
                self.weight,
                self.bias,
                merged.mean,
                invstd,
                _SyncInfo(merged.count, group, self.timeout, name, tag),
            )
        if count == 0:
            return torch.empty_like(x)
        return ops.transform(x, merged.mean, invstd, self.weight, self.bias)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.timeout is not None:
            text += f", timeout={self.timeout.total_seconds():g}s"
        return text


class _SyncInfo:
    """What the backward needs besides tensors (kept out of autograd's argument list)."""

    __slots__ = ("count", "group", "layer", "tag", "timeout")

    def __init__(self, count: int, group, timeout, layer: str, tag: tuple[int, int]):
        self.count = count
        self.group = group
        self.timeout = timeout
        self.layer = layer
        self.tag = tag


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = transform(x)`` with the global statistics; the backward sums its reductions over
    ranks before the elementwise step (see :func:`bnorm.reference.backward`: with ``n`` the
    global count, ``dx = w·invstd·(dy - Σdy/n - (x-μ)·invstd²·Σdy(x-μ)/n)``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, info: _SyncInfo):  # type: ignore[override]
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.info = info
        if x.numel() == 0:
            return torch.empty_like(x)
        return ops.transform(x, mean, invstd, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        info: _SyncInfo = ctx.info
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        if x.numel() > 0:
            dy = dy.contiguous(memory_format=layout_of(x))
            sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
        else:
            sum_dy = sum_dy_xmu = torch.zeros(channels, dtype=torch.float64, device=x.device)
        # Every rank reaches this collective (agreed in the forward), whatever it needs itself.
        g_sum_dy, g_sum_dy_xmu = _dist.all_reduce_grad_sums(
            sum_dy,
            sum_dy_xmu,
            tag=info.tag,
            group=info.group,
            timeout=info.timeout,
            layer=info.layer,
            dtype=x.dtype,
        )
        dx = None
        if need_x:
            if x.numel() > 0:
                dx = ops.backward_elementwise(
                    dy, x, mean, invstd, weight, g_sum_dy, g_sum_dy_xmu, info.count
                )
            else:
                dx = torch.zeros_like(x)
        # Parameter gradients are this rank's share; DDP's all-reduce sums them over ranks.
        dweight = (sum_dy_xmu * invstd).to(weight.dtype) if need_w else None
        dbias = sum_dy.to(weight.dtype if weight is not None else x.dtype) if need_b else None
        return dx, dweight, dbias, None, None, None


_CONVERTIBLE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    _bn.BatchNorm1d,
    _bn.BatchNorm2d,
    _bn.BatchNorm3d,
    SyncBatchNorm,
)
# batch norm + activation layers (bnorm's and timm's), synchronized as SyncBatchNormAct
_NORM_ACT = (
    ("bnorm.modules.act", "BatchNormAct1d"),
    ("bnorm.modules.act", "BatchNormAct2d"),
    ("bnorm.modules.act", "SyncBatchNormAct"),
    ("timm.layers.norm_act", "BatchNormAct2d"),
    ("timm.layers.norm_act", "SyncBatchNormAct"),
)


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    *,
    timeout: datetime.timedelta | float | None = None,
    return_summary: bool = False,
) -> nn.Module:
    """Replace every batch-norm layer of ``module`` by a :class:`SyncBatchNorm` over
    ``process_group``, keeping its state, and every batch norm + activation layer by a
    :class:`bnorm.SyncBatchNormAct`, keeping its activation.

    Converted: torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, bnorm's ``BatchNorm1d/2d/3d``
    (exact classes), and ``BatchNormAct1d/2d`` (bnorm's; a memory-efficient one becomes a plain
    synchronized one) and timm's ``BatchNormAct2d``/``SyncBatchNormAct`` (their ``.act`` and
    ``.drop`` modules kept). Left, with a :class:`bnorm.LayersLeftWarning` listing
    them: subclasses of torch's batch norm (unlike torch's ``convert_sync_batchnorm``, which
    turns them into plain SyncBatchNorm and so drops whatever they add, as it drops timm's
    activation) and other batch-norm-like layers that compute something else (renorm, ghost
    batch norm); frozen layers have nothing to synchronize and are left without a warning.

    The new layer holds the old one's parameters and buffers (the same tensor objects, so an
    optimizer built before still updates them), its mode, hooks and ``on_nonfinite`` setting;
    ``timeout`` is set on every converted layer. Changes ``module`` in place and returns it (or
    the new layer, if ``module`` is itself a batch norm); with ``return_summary=True``,
    ``(module, summary)`` (a :class:`bnorm.ConversionSummary`, also logged on
    the ``"bnorm"`` logger). Not an error when not distributed: the layers then compute local
    batch norm. To go back to local layers after training, load the state_dict into the
    original model: the keys are the same.
    """
    from ..tools.convert import rewrite

    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_sync_batchnorm: expected a torch.nn.Module, got {type(module).__name__}"
        )
    delta = _as_timedelta(timeout)
    new, summary = rewrite(
        module,
        lambda m: _to_sync(m, process_group, delta),
        "convert_sync_batchnorm",
    )
    return (new, summary) if return_summary else new


def _to_sync(m: nn.Module, group, timeout) -> nn.Module | str | None:
    from ..tools.convert import is_batch_norm_like
    from .act import SyncBatchNormAct

    cls = type(m)
    if (cls.__module__, cls.__qualname__) in _NORM_ACT:
        return _as_sync(m, SyncBatchNormAct, group, timeout)
    if cls in _CONVERTIBLE:
        return _as_sync(m, SyncBatchNorm, group, timeout)
    if not is_batch_norm_like(m) or "Frozen" in cls.__name__:
        return None
    return "not plain batch norm (it may compute something else), so it is not synchronized"


def _as_sync(module: nn.Module, target: type[nn.Module], group, timeout) -> nn.Module:
    """A ``target`` (SyncBatchNorm or a subclass) holding ``module``'s state and children."""
    new = target.__new__(target)
    # Modules keep their whole state in __dict__; copy the containers, share the tensors.
    state = {
        k: (v.copy() if isinstance(v, dict | OrderedDict) else v)
        for k, v in module.__dict__.items()
        if k not in ("memory_efficient", "overwrite_input")
    }
    for key, default in SyncBatchNorm._bnorm_defaults.items():
        state.setdefault(key, default)
    state["process_group"] = group
    state["timeout"] = timeout
    state["_sync_calls"] = 0
    state["sync_id"] = _next_sync_id()
    object.__setattr__(new, "__dict__", state)
    return new
