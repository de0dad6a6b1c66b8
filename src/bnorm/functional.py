r"""Functional batch normalization for PyTorch tensors, computed by bnorm's own kernels.

:func:`batch_norm` has the signature of :func:`torch.nn.functional.batch_norm` and its
behaviour, with two differences that only show where torch is weak:

- **precision**: statistics are accumulated around a per-channel shift and the normalization
  subtracts the mean in two exact steps, so an fp32 input whose mean is 1e5 times its standard
  deviation is still normalized to about 1e-6 (torch's CPU kernel: about 1e-2);
- **non-finite batches**: a training batch holding NaN or Inf does not poison the running
  statistics; they are left as they were and a :class:`~bnorm.errors.NonFiniteBatchWarning` is
  issued (``on_nonfinite="raise"`` raises :class:`~bnorm.errors.NonFiniteBatchError` instead).

The work is split as statistics -> transform -> backward reductions -> backward elementwise
(see :mod:`bnorm.kernels`); the backward is bnorm's own, and a composite of torch ops is
differentiated when a second derivative is asked for (``create_graph=True``).
On non-CPU tensors (CUDA, MPS, ...) bnorm has no kernels yet and calls torch's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks, kernels
from .errors import NonFiniteBatchError, NonFiniteBatchWarning
from .kernels import Backend, as_supported_layout, select_backend

__all__ = ["batch_norm"]


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
    layer: str = "batch_norm",
) -> Tensor:
    """The computation behind :func:`batch_norm` and bnorm's layers, once the input is checked.

    ``momentum=None`` means the cumulative average and needs ``num_batches_tracked``, which is
    advanced by one when the running statistics are updated (and for an empty batch, as torch).
    """
    if x.device.type != "cpu":
        return _torch_fallback(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            use_batch_stats,
            momentum,
            eps,
            num_batches_tracked,
        )
    x = as_supported_layout(x)
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    backend = select_backend(x)
    if backend is kernels.NUMBA and count > 0:
        y = _fused_numba(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            use_batch_stats,
            momentum,
            eps,
            num_batches_tracked,
            on_nonfinite,
            layer,
        )
        if y is not None:
            return y
    if use_batch_stats:
        if count == 0:
            # Nothing to normalize; any finite stand-ins give the empty output and zero grads.
            mean = torch.zeros(channels, dtype=torch.float64)
            var = torch.ones(channels, dtype=torch.float64)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
        else:
            with torch.no_grad():
                mean, var = backend.statistics(x.detach())
            if running_mean is not None or running_var is not None:
                update_running_stats(
                    running_mean,
                    running_var,
                    mean,
                    var,
                    count,
                    momentum,
                    num_batches_tracked,
                    on_nonfinite,
                    layer,
                )
        invstd = torch.rsqrt(var + eps)
    else:
        assert running_mean is not None and running_var is not None
        mean = running_mean.detach().to(torch.float64)
        invstd = torch.rsqrt(running_var.detach().to(torch.float64) + eps)
    if _needs_grad(x, weight, bias):
        return _BatchNormFunction.apply(
            x, weight, bias, mean, invstd, use_batch_stats, eps, backend
        )
    return backend.transform(x, mean, invstd, weight, bias)


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
    channel. The update is computed in float64 and stored in the buffers' dtype.
    """
    if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
        _report_nonfinite(layer, on_nonfinite, stacklevel=5)
        return
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(
                f"{layer}: momentum=None (cumulative average) needs num_batches_tracked"
            )
        rate = 1.0 / (int(num_batches_tracked) + 1)
    else:
        rate = float(momentum)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_((1 - rate) * running_mean.to(torch.float64) + rate * mean)
        if running_var is not None:
            unbiased = var * (count / (count - 1))
            running_var.copy_((1 - rate) * running_var.to(torch.float64) + rate * unbiased)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)


def _report_nonfinite(layer: str, on_nonfinite: str, stacklevel: int) -> None:
    message = (
        f"{layer}: the training batch holds NaN or Inf; running_mean, running_var and "
        f"num_batches_tracked were left unchanged (torch would have overwritten them)"
    )
    if on_nonfinite == "raise":
        raise NonFiniteBatchError(message)
    warnings.warn(message, NonFiniteBatchWarning, stacklevel=stacklevel)


_F32 = torch.float32
_F64 = torch.float64
_I64 = torch.int64


def _kernel_counter(num_batches_tracked: Tensor) -> bool:
    """Whether the compiled update can advance the counter: it writes one int64 in place."""
    t = num_batches_tracked
    return t.dtype is _I64 and t.is_cpu and t.numel() == 1


def _common_case(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
) -> bool:
    """Whether the fast paths' kernels can take ``x`` and the per-channel tensors as they are:
    a plain CPU float32/float64 tensor, the numba backend, and per-channel tensors of ``C``
    values of x's dtype, contiguous, on the CPU (the kernels read, and the training update
    writes, one value per channel: a tensor of another size, e.g. a replaced parameter, goes to
    the checked path and its error)."""
    # the cheapest and most selective tests first; each costs tens of nanoseconds, against the
    # microseconds of the checked path
    if type(x) is not Tensor or kernels._forced is not None or kernels.numba_cpu is None:
        return False
    dt = x.dtype
    if (dt is not _F32 and dt is not _F64) or not x.is_cpu:
        return False
    channels = x.shape[1]
    for t in (weight, bias, running_mean, running_var):
        if t is not None and (
            t.dtype is not dt or not t.is_cpu or not t.is_contiguous() or t.numel() != channels
        ):
            return False
    return True


def _needs_grad(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether autograd records this call (then the fast paths go through a Function)."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def fused_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor | None,
    eps: float,
) -> Tensor | None:
    """The layers' fast path in evaluation: ``y = (x - running_mean) / sqrt(running_var + eps)
    * weight + bias`` by one compiled pass; ``None`` when anything is unusual (the caller then
    takes the checked path, whose errors name the problem).

    The common case is :func:`fused_forward`'s (:func:`_common_case`): a plain CPU
    float32/float64 tensor ``(N, C, *)`` of at least one value, contiguous or
    channels_last(_3d), per-channel tensors of ``C`` values of its dtype, contiguous, on the
    CPU, a positive ``eps`` and the numba backend. The layers call it directly in evaluation
    with only what evaluation reads: on a 1 MB input the Python around the kernel costs about
    half a ``clone()``, and every argument and test counts.
    """
    if running_var is None or not eps > 0:
        return None
    if not _common_case(x, weight, bias, running_mean, running_var):
        return None
    if x.numel() == 0:  # an empty batch: the checked path returns an empty result
        return None
    if _needs_grad(x, weight, bias):
        return _FusedEvalFunction.apply(x, weight, bias, running_mean, running_var, eps)
    return kernels.numba_cpu.eval_forward_checked(
        x, running_mean, running_var, weight, bias, float(eps)
    )


def fused_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    update: bool,
    momentum: float | None,
    eps: float,
    on_nonfinite: str,
    layer: Callable[[], str],
) -> Tensor | None:
    """The layers' fast path when the batch's own statistics normalize (training, or no
    running statistics): the common case, recognized in a few comparisons and computed by one
    compiled call each way; ``None`` when anything is unusual (the caller then takes the
    checked path, whose errors name the problem). Evaluation has :func:`fused_eval`.

    The common case: a plain CPU float32/float64 tensor of at least two values per channel in
    a dense layout, per-channel tensors of the same dtype, contiguous, on the CPU, a positive
    ``eps`` and the numba backend. ``update`` says whether the running statistics (then given,
    with ``num_batches_tracked``) move towards the batch's. ``layer`` gives the layer's name
    for messages (called only when one is needed). Arguments are positional: for small inputs
    the Python around the kernel costs as much as the kernel, and keywords add to it.
    """
    if not _common_case(x, weight, bias, running_mean, running_var):
        return None
    if not eps > 0 or on_nonfinite not in _checks.NONFINITE_POLICIES:
        return None
    needs_grad = _needs_grad(x, weight, bias)
    channels = x.shape[1]
    numel = x.numel()
    if numel <= channels:  # empty, or one value per channel: the checked path says what to do
        return None
    if update:
        if running_mean is None or running_var is None:
            return None
        if num_batches_tracked is None:
            if momentum is None:
                return None
        elif not _kernel_counter(num_batches_tracked):
            return None
    else:
        running_mean = running_var = num_batches_tracked = None
    if needs_grad:
        if numel < NATIVE_MAX_NUMEL and x.is_contiguous():
            y = _native_small(
                x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                on_nonfinite, layer, numel // channels,
            )  # fmt: skip
            if y is not None:
                return y
        return _FusedTrainFunction.apply(
            x,
            weight,
            bias,
            (running_mean, running_var, num_batches_tracked, momentum, eps, on_nonfinite, layer),
        )
    y, _stats, finite = kernels.numba_cpu.train_forward(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
    )
    if not finite and running_mean is not None:
        _report_nonfinite(layer(), on_nonfinite, stacklevel=5)
    return y


#: training inputs needing gradients with fewer values than this take torch's own kernel,
#: when it is precise enough (see _native_small); measured: below 64K values torch's node was
#: 5-15% faster than bnorm's kernels behind a Python Function, from 128K values on slower
NATIVE_MAX_NUMEL = 1 << 16
#: torch's kernel is used only while every channel's |mean| / std stays below this: its error
#: grows as about 1.3e-7 times that ratio (measured), so below 8 it is within 1.1e-6
NATIVE_MAX_RATIO = 8.0


def _native_small(
    x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
    on_nonfinite, layer, count,
) -> Tensor | None:  # fmt: skip
    """Training batch norm of a small input through torch's own kernel; ``None`` when its
    result would not be precise enough (the caller then computes with bnorm's kernels).

    Why: on a few thousand values a batch norm costs microseconds, and the autograd of a Python
    ``Function`` (bnorm's kernels) costs about ten more than torch's native node; for these
    sizes torch's node is the faster way. bnorm's guarantees still hold: the running statistics
    are not handed to torch (its kernel would write NaN into them) but updated here with the NaN
    guard, and a batch whose mean is far from zero relative to its spread, where torch loses
    digits, is computed by bnorm's kernels instead.
    """
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    status = kernels.numba_cpu.update_from_batch(
        mean, invstd, running_mean, running_var, num_batches_tracked, momentum, eps, count,
        NATIVE_MAX_RATIO,
    )  # fmt: skip
    if status == 2:
        return None
    if status == 1 and running_mean is not None:
        _report_nonfinite(layer(), on_nonfinite, stacklevel=6)
    return y


def _fused_numba(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_batch_stats: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    on_nonfinite: str,
    layer: str,
) -> Tensor | None:
    """The numba backend's fused kernels for a checked call: one compiled call per forward
    (and per backward).

    Same results and semantics as the step-by-step path below it; returns ``None`` for the
    cases it leaves to that path (one running buffer without the other, buffers of another
    dtype, ``momentum=None`` without a counter).
    """
    numba_cpu = kernels.numba_cpu
    needs_grad = _needs_grad(x, weight, bias)
    if not use_batch_stats:
        if not numba_cpu.fused_buffers_ok(x, running_mean, running_var):
            return None
        assert running_mean is not None and running_var is not None
        if needs_grad:
            return _FusedEvalFunction.apply(x, weight, bias, running_mean, running_var, eps)
        return numba_cpu.eval_forward(x, running_mean, running_var, weight, bias, eps)
    if (running_mean is None) != (running_var is None):
        return None
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        return None  # the step-by-step path raises the error that names the problem
    if not numba_cpu.fused_buffers_ok(x, running_mean, running_var):
        return None
    if num_batches_tracked is not None and not _kernel_counter(num_batches_tracked):
        return None  # the step-by-step path advances it with torch ops
    if needs_grad:
        state = (running_mean, running_var, num_batches_tracked, momentum, eps, on_nonfinite)
        return _FusedTrainFunction.apply(x, weight, bias, (*state, lambda: layer))
    y, _stats, finite = numba_cpu.train_forward(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
    )
    if not finite and running_mean is not None:
        _report_nonfinite(layer, on_nonfinite, stacklevel=5)
    return y


class _FusedTrainFunction(torch.autograd.Function):
    """Training-mode batch norm on the numba backend: one compiled call forward, one backward.

    The running statistics are updated inside the forward call (they carry no gradient). The
    backward is :func:`bnorm.kernels.numba_cpu.train_backward`; a second derivative
    (``create_graph=True``) differentiates the same composite of torch ops as
    :class:`_BatchNormFunction`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, state):  # type: ignore[override]
        # the non-differentiable arguments travel as one tuple: each argument of apply() costs
        # autograd a little bookkeeping, which adds up on small tensors
        running_mean, running_var, nbt, momentum, eps, on_nonfinite, layer = state
        y, stats, finite = kernels.numba_cpu.train_forward(
            x, weight, bias, running_mean, running_var, nbt, momentum, eps
        )
        if not finite and running_mean is not None:
            _report_nonfinite(layer(), on_nonfinite, stacklevel=7)
        _save(ctx, x, weight, bias, stats)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, stats = _saved(ctx)
        if torch.is_grad_enabled():
            ctx.use_batch_stats = True
            stats = stats.view(2, -1)
            dx, dw, db = _composite_grads(ctx, dy, x, weight, bias, stats[0], stats[1])
        else:
            dx, dw, db = kernels.numba_cpu.train_backward(
                dy, x, stats, weight, bias, ctx.needs_input_grad
            )
        return dx, dw, db, None


#: inputs with fewer values than this are kept as attributes of the autograd context rather
#: than through ``ctx.save_for_backward`` (see :func:`_save`)
SMALL_SAVE_NUMEL = 1 << 15


def _save(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, extra: Tensor) -> None:
    """Keep what the backward needs.

    ``ctx.save_for_backward`` costs about a microsecond per tensor to unpack, a tenth of a small
    batch norm's whole backward. For small inputs the tensors are kept as plain attributes with
    their version counters, and :func:`_saved` raises torch's error if one was modified in place
    in between, as ``save_for_backward`` would. (What small inputs give up: saved-tensor hooks,
    such as activation offloading, do not see them; they are small.)
    """
    if x.numel() < SMALL_SAVE_NUMEL:
        ctx.kept = (x, weight, bias, extra)
        ctx.versions = tuple(None if t is None else t._version for t in (x, weight, bias))
    else:
        ctx.kept = None
        ctx.save_for_backward(x, weight, bias, extra)


def _saved(ctx) -> tuple:
    kept = ctx.kept
    if kept is None:
        return ctx.saved_tensors
    for t, version, name in zip(kept[:3], ctx.versions, ("input", "weight", "bias"), strict=True):
        if t is not None and t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: the batch norm's {name} {t.type()}{list(t.shape)} is at "
                f"version {t._version}; expected version {version} instead."
            )
    return kept


class _FusedEvalFunction(torch.autograd.Function):
    """Evaluation-mode batch norm on the numba backend (running statistics are constants):
    one compiled call forward (:func:`~bnorm.kernels.numba_cpu.eval_forward`), one backward
    (:func:`~bnorm.kernels.numba_cpu.eval_backward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias, running_mean, running_var)
        ctx.eps = eps
        return kernels.numba_cpu.eval_forward(x, running_mean, running_var, weight, bias, eps)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, running_mean, running_var = ctx.saved_tensors
        if torch.is_grad_enabled():
            ctx.use_batch_stats = False
            mean = running_mean.detach().to(_F64)
            invstd = torch.rsqrt(running_var.detach().to(_F64) + ctx.eps)
            grads = _composite_grads(ctx, dy, x, weight, bias, mean, invstd)
        else:
            grads = kernels.numba_cpu.eval_backward(
                dy, x, running_mean, running_var, weight, bias, ctx.eps, ctx.needs_input_grad
            )
        return (*grads, None, None, None)


class _BatchNormFunction(torch.autograd.Function):
    """``y = transform(x)`` with statistics computed before; backward by the backend's kernels.

    ``mean`` and ``invstd`` arrive as constants. With batch statistics, the backward accounts for
    their dependence on ``x`` analytically (see :func:`bnorm.reference.backward`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, use_batch_stats, eps, backend: Backend):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.use_batch_stats = use_batch_stats
        ctx.eps = eps
        ctx.backend = backend
        return backend.transform(x, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            grads = _composite_grads(ctx, dy, x, weight, bias, mean, invstd)
        else:
            grads = _kernel_grads(ctx, dy, x, weight, bias, mean, invstd, need_x, need_w, need_b)
        return (*grads, None, None, None, None, None)


def _kernel_grads(ctx, dy, x, weight, bias, mean, invstd, need_x, need_w, need_b):
    backend: Backend = ctx.backend
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64)
        sum_dy = sum_dy_xmu = zeros
        dx = torch.zeros_like(x) if need_x else None
    else:
        dy = dy.contiguous(memory_format=_layout_of(x))
        sum_dy = sum_dy_xmu = None
        if need_w or need_b or (need_x and ctx.use_batch_stats):
            sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean)
        dx = None
        if need_x and ctx.use_batch_stats:
            dx = backend.backward_elementwise(
                dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count
            )
        elif need_x:
            # Fixed statistics: dx = weight * invstd * dy, i.e. the transform of dy around 0.
            dx = backend.transform(dy, torch.zeros_like(mean), invstd, weight, None)
    dweight = (sum_dy_xmu * invstd).to(weight.dtype) if need_w else None
    dbias = sum_dy.to(bias.dtype) if need_b else None
    return dx, dweight, dbias


def _composite_grads(ctx, dy, x, weight, bias, mean, invstd):
    """Gradients as a differentiable graph (for ``create_graph=True``): recompute the forward
    from torch ops on the saved inputs and differentiate that."""
    wanted = [
        t for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3], strict=True) if need
    ]
    y = _composite_forward(x, weight, bias, mean, invstd, ctx.use_batch_stats, ctx.eps)
    found = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in ctx.needs_input_grad[:3])


def _composite_forward(x, weight, bias, mean, invstd, use_batch_stats, eps):
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    xf = x.to(cd)
    if use_batch_stats:
        dims = [0, *range(2, x.dim())]
        var, mu = torch.var_mean(xf, dims, correction=0, keepdim=True)
        y = (xf - mu) * torch.rsqrt(var + eps)
    else:
        y = (xf - mean.to(cd).view(shape)) * invstd.to(cd).view(shape)
    if weight is not None:
        y = y * weight.to(cd).view(shape)
    if bias is not None:
        y = y + bias.to(cd).view(shape)
    return y.to(x.dtype)


def _layout_of(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


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
