r"""Functional batch normalization for PyTorch tensors, computed by bnorm's own kernels.

:func:`batch_norm` has the signature of :func:`torch.nn.functional.batch_norm` and its
behaviour, with two differences that only show where torch is weak:

- **precision**: statistics are accumulated around a per-channel shift and the normalization
  subtracts the mean in two exact steps, so an fp32 input whose mean is 1e5 times its standard
  deviation is still normalized to about 1e-6 (torch's CPU kernel: about 1e-2);
- **non-finite batches**: a training batch holding NaN or Inf does not poison the running
  statistics; they are left as they were and a :class:`~bnorm.errors.NonFiniteBatchWarning` is
  issued (``on_nonfinite="raise"`` raises :class:`~bnorm.errors.NonFiniteBatchError` instead).

Routes (each gives the same numbers, to 1e-6):

- eagerly, on CPU (and meta/fake tensors): bnorm's operators, ``torch.ops.bnorm.batch_norm_train``
  (statistics and output in one call, autograd in C++), ``batch_norm_eval`` and
  ``update_running_stats_`` (see :mod:`bnorm.ops`);
- under ``torch.jit.trace``/``script`` and ``torch.fx``: the one operator
  ``torch.ops.bnorm.batch_norm``, composed of those;
- under ``torch.compile``/``torch.export``, ``torch.func`` transforms and forward-mode AD: the
  composite path, the same algorithm in aten ops, which those tools differentiate, batch and
  fuse;
- on other devices (CUDA, MPS, ...), where bnorm has no kernels yet: torch's own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks, ops
from .errors import NonFiniteBatchError, NonFiniteBatchWarning

__all__ = ["batch_norm", "batch_norm_unchecked", "train_forward", "update_running_stats"]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    on_nonfinite: str = "warn",
) -> Tensor:
    r"""Batch normalization of ``input`` of shape (N, C, \*), a drop-in for torch's.

    .. math::  y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    Args:
        input: (N, C, \*) floating-point tensor; contiguous or channels_last layouts are kept
            (other strides give a contiguous output, as torch).
        running_mean, running_var: (C,) buffers. In training they are updated in place,
            ``r <- (1 - momentum) * r + momentum * batch_stat``, the variance unbiased
            (``n/(n-1)``); ``None`` skips the update. In evaluation they normalize and are
            required.
        weight, bias: (C,) affine parameters :math:`\gamma, \beta`, or ``None``.
        training: ``True`` normalizes with the batch's own mean and biased variance.
        momentum: the update rate of the running statistics (PyTorch's convention).
        eps: added to the variance; must be positive in training and non-negative in eval.
        on_nonfinite: ``"warn"`` (default) or ``"raise"``, for a training batch holding
            NaN/Inf; either way the running statistics are left untouched.

    Returns:
        A tensor of the input's shape, dtype and layout. bfloat16/float16 inputs may come with
        float32 parameters and buffers; statistics are then computed in float32 or better.
    """
    if torch.overrides.has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return torch.overrides.handle_torch_function(
            batch_norm,
            (input, running_mean, running_var, weight, bias),
            input,
            running_mean,
            running_var,
            weight=weight,
            bias=bias,
            training=training,
            momentum=momentum,
            eps=eps,
            on_nonfinite=on_nonfinite,
        )
    layer = "batch_norm"
    _checks.check_tensor(layer, input)
    _checks.check_nonfinite_policy(layer, on_nonfinite)
    if training:
        _checks.check_batch_size(layer, input)
        _checks.check_eps(layer, eps, training=True)
    else:
        _checks.check_eps(layer, eps, allow_zero=True)
        if running_mean is None or running_var is None:
            raise ValueError(f"{layer}: running_mean must be defined in evaluation mode")
    _checks.check_momentum(layer, momentum)
    if input.dim() < 2:
        if input.numel() == 0:
            return input.clone()  # torch returns an empty result for a (0,) input
        raise _checks.BatchNormShapeError(
            f"{layer}: expected an input of shape (N, C, *) with at least 2 dims, "
            f"got shape {_checks.shape_text(input)}"
        )
    per_channel = {
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": weight,
        "bias": bias,
    }
    _checks.check_per_channel(layer, input, per_channel, empty_ok=True)
    return batch_norm_unchecked(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        use_batch_stats=training,
        momentum=momentum,
        eps=eps,
        on_nonfinite=on_nonfinite,
        layer=layer,
    )


def batch_norm_unchecked(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    use_batch_stats: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
    on_nonfinite: str = "warn",
    layer: str | Callable[[], str] = "batch_norm",
) -> Tensor:
    """The computation behind :func:`batch_norm` and bnorm's layers, once the input is checked.

    ``layer`` names the caller in messages: a string, or a function that returns it (a layer
    passes its name-maker, so that the name is formatted only when a message needs it).

    With ``use_batch_stats`` the batch's statistics normalize and the given running statistics
    (either may be ``None``) move towards them; ``momentum=None`` means the cumulative average
    and needs ``num_batches_tracked``, which is advanced by one per update (and for an empty
    batch, as torch). Without, the running statistics normalize and nothing changes.
    """
    if not x.is_cpu and x.device.type != "meta":
        return _torch_fallback(
            x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
            num_batches_tracked,
        )  # fmt: skip
    if use_batch_stats and momentum is None and running_mean is not None:
        if num_batches_tracked is None:
            raise ValueError(
                f"{_name(layer)}: momentum=None (cumulative average) needs num_batches_tracked"
            )
    if composite_wanted():
        return _composite(
            x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
            num_batches_tracked,
        )  # fmt: skip
    if torch.jit.is_tracing():
        # one node in the trace, with the running statistics' update inside it
        return _ops.batch_norm.default(
            x, weight, bias, running_mean, running_var, num_batches_tracked, use_batch_stats,
            momentum, eps,
        )  # fmt: skip
    if not use_batch_stats:
        assert running_mean is not None and running_var is not None
        return _ops.batch_norm_eval.default(x, weight, bias, running_mean, running_var, eps)
    if running_mean is None and running_var is None:
        return _ops.batch_norm_train.default(x, weight, bias, eps)[0]
    if ops.EXTENSION:
        # one call (statistics, output and update in C++); a skipped update is counted there
        before = ops.nonfinite_skips()
        y = _ops.batch_norm.default(
            x, weight, bias, running_mean, running_var, num_batches_tracked, True, momentum, eps
        )
        if ops.nonfinite_skips() != before:
            _report_nonfinite(_name(layer), on_nonfinite, stacklevel=5)
        return y
    y, mean, var = _ops.batch_norm_train.default(x, weight, bias, eps)
    if running_mean is not None or running_var is not None:
        update_running_stats(
            running_mean, running_var, mean, var, _count(x), momentum, num_batches_tracked,
            on_nonfinite, _name(layer),
        )  # fmt: skip
    return y


_ops = torch.ops.bnorm  # (calls name the overload, .default: resolving it costs microseconds)


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm of a checked input without the running statistics:
    ``(y, mean, var)``, the batch's statistics float64 (C,) (var biased). The route is
    :func:`batch_norm_unchecked`'s: the operator, or the composite path where a tool needs it."""
    if composite_wanted():
        return _composite_train(x, weight, bias, eps)
    return _ops.batch_norm_train.default(x, weight, bias, eps)


def _name(layer: str | Callable[[], str]) -> str:
    return layer() if callable(layer) else layer


def _count(x: Tensor) -> int:
    """Values per channel of an (N, C, *) tensor."""
    channels = x.shape[1]
    return x.numel() // channels if channels else 0


def composite_wanted() -> bool:
    """Whether a call now must take the composite path (aten ops): under torch.compile or
    torch.export (inductor fuses it; exported programs hold aten ops), inside a torch.func
    transform (vmap, grad, jvp...), or with forward-mode AD active."""
    return torch.compiler.is_compiling() or _any_order_wanted()


def _any_order_wanted() -> bool:
    """Whether derivatives of any order or batching may be asked of this call: forward-mode
    AD is active, or a torch.func transform (vmap, grad, jvp, functionalize...). (The
    transforms' test is the one dynamo traces: it traces ``peek_interpreter_stack() is None``
    as False.)"""
    return (
        torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
    )


def _composite_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The composite training forward: under ``torch.compile`` alone (not export, no forward-mode
    AD, no torch.func transform, which need derivatives of every order) the variant whose
    gradient is written out, which inductor compiles as tightly as torch's own batch norm."""
    if (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not _any_order_wanted()
    ):
        return ops.inductor_train(x, weight, bias, eps)
    return ops.composite_train(x, weight, bias, eps)


#: ``plain_eval_call(x, layer.__dict__, ranks)``: a bnorm BatchNorm layer's evaluation of a plain
#: CPU tensor in one C++ call (its checks, then ``torch.ops.bnorm.batch_norm_eval`` through the
#: dispatcher), or None when the call needs the layer's Python path. Only where
#: :func:`composite_wanted` is False; None without the extension.
plain_eval_call: Callable[[Tensor, dict, tuple[int, ...]], Tensor | None] | None = (
    ops.eval_call if ops.EXTENSION else None
)


def _composite(
    x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
    num_batches_tracked,
) -> Tensor:  # fmt: skip
    if not use_batch_stats:
        return ops.composite_eval(x, weight, bias, running_mean, running_var, eps)
    y, mean, var = _composite_train(x, weight, bias, eps)
    if running_mean is not None or running_var is not None:
        ops.composite_update(
            running_mean, running_var, num_batches_tracked, mean, var, _count(x), momentum
        )
    return y


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    on_nonfinite: str,
    layer: str,
) -> None:
    """Move the running statistics towards one batch's; skip (and warn or raise) if non-finite.

    ``mean`` and ``var`` (biased) are the batch's float64 statistics over ``count`` values per
    channel. The update, ``r <- (1 - rate) r + rate * batch`` with the variance unbiased
    (``count/(count-1)``), is computed in float64 from those statistics and stored in the
    buffers' dtype; ``rate`` is ``momentum``, or ``1/(t+1)`` for the t-th batch when
    ``momentum`` is None. A batch holding NaN/Inf changes nothing (not even the counter).
    """
    if momentum is None and num_batches_tracked is None and count > 0:
        raise ValueError(f"{layer}: momentum=None (cumulative average) needs num_batches_tracked")
    if composite_wanted():  # no Python branch on the data: where() skips it
        ops.composite_update(
            running_mean, running_var, num_batches_tracked, mean, var, count, momentum
        )
        return
    if (
        count > 0
        and type(mean) is Tensor  # a real tensor (not fake, not a tracer's): it can be read
        and mean.device.type == "cpu"
        and not math.isfinite(float((mean + var).sum()))  # NaN or Inf in either
    ):
        _report_nonfinite(layer, on_nonfinite, stacklevel=5)
        return
    _ops.update_running_stats_.default(
        running_mean, running_var, num_batches_tracked, mean, var, count, momentum
    )


def _report_nonfinite(layer: str, on_nonfinite: str, stacklevel: int) -> None:
    message = (
        f"{layer}: the training batch holds NaN or Inf; running_mean, running_var and "
        f"num_batches_tracked were left unchanged (torch would have overwritten them)"
    )
    if on_nonfinite == "raise":
        raise NonFiniteBatchError(message)
    warnings.warn(message, NonFiniteBatchWarning, stacklevel=stacklevel)


def _torch_fallback(
    x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps, num_batches_tracked
):
    """Non-CPU tensors: torch's own kernels (cuDNN on CUDA) until bnorm has kernels there."""
    rate = momentum
    if use_batch_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            rate = 1.0 / float(num_batches_tracked)
    return torch.batch_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        use_batch_stats,
        0.0 if rate is None else rate,
        eps,
        torch.backends.cudnn.enabled,
    )
