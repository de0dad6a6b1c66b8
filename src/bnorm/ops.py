r"""The Python side of bnorm's operators (``torch.ops.bnorm.*``).

The operators are defined in C++ (``csrc/ops.cpp``, built at install time into ``bnorm._C``):
schemas in ``TORCH_LIBRARY(bnorm, m)``, CPU kernels on PyTorch's thread pool, autograd for
``batch_norm_train`` and ``batch_norm_eval``. This module adds what PyTorch's tools need from
Python:

- **fake/meta kernels** (:func:`torch.library.register_fake`): shapes, dtypes and strides of
  every output, so ``FakeTensorMode``, the meta device, ``torch.compile`` and ``torch.export``
  can reason about the operators without running them;
- **the composite path**: the same algorithm written in aten ops (:func:`composite_train`,
  :func:`composite_eval`, :func:`composite_update`), differentiable to any order and
  transformable by ``torch.func``. :mod:`bnorm.functional` takes it under ``torch.compile`` and
  ``torch.export`` (inductor fuses it with its neighbours, and the exported program holds only
  aten ops, which ONNX knows), under ``vmap``/``grad`` and forward-mode AD;
- **the steps** used by SyncBatchNorm and the remedies: :func:`statistics`, :func:`transform`,
  :func:`backward_reduce`, :func:`backward_elementwise`.

Where the extension was not built (no C++ compiler at install time), the same schemas are
defined here with the composite kernels, so every layer and tool still works, more slowly;
``import bnorm`` warns once and says how to build it.

The algorithm (both paths): per-channel statistics are float64 sums of ``x - k``, with ``k``
one sample of the channel; the elementwise steps subtract ``hi`` = the mean rounded to the
data's dtype first and fold the rest of the mean into the offset, so data whose mean is far
from zero relative to its spread (1e5 standard deviations in float32) keeps its digits.
Per-channel statistics are float64 tensors of shape (C,).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from .errors import ExtensionWarning

__all__ = [
    "EXTENSION",
    "backward_elementwise",
    "backward_reduce",
    "composite_eval",
    "composite_train",
    "composite_update",
    "inductor_train",
    "statistics",
    "transform",
]

_F64 = torch.float64

#: The operator schemas. The C++ extension defines the same ones (a test compares them); they
#: are defined from here only where the extension is missing.
SCHEMAS: dict[str, str] = {
    "stats": "stats(Tensor input) -> (Tensor mean, Tensor var)",
    "transform": (
        "transform(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) "
        "-> Tensor"
    ),
    "backward_reduce": (
        "backward_reduce(Tensor grad_out, Tensor input, Tensor mean) "
        "-> (Tensor sum_dy, Tensor sum_dy_xmu)"
    ),
    "backward_elemt": (
        "backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, "
        "Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, SymInt count) -> Tensor"
    ),
    "batch_norm_train": (
        "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor out, Tensor save_mean, Tensor save_var)"
    ),
    "batch_norm_eval": (
        "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
        "Tensor running_var, float eps) -> Tensor"
    ),
    "batch_norm_backward": (
        "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, "
        "Tensor var, float eps, bool train, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
    ),
    "update_running_stats_": (
        "update_running_stats_(Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, SymInt count, float? momentum) "
        "-> ()"
    ),
    "batch_norm": (
        "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool use_batch_stats, "
        "float? momentum, float eps) -> Tensor"
    ),
}


# ---- the composite path: the same algorithm in aten ops ---------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    # bfloat16/float16 are computed in float32, as PyTorch's own CPU kernel does
    return _F64 if x.dtype == _F64 else torch.float32


def _bshape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _f64(t: Tensor | None, fill: float, like: Tensor) -> Tensor:
    if t is None:
        return torch.full_like(like, fill, dtype=_F64)
    return t.to(_F64).reshape(-1)


def composite_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, \\*), float64, differentiable.

    Taken on ``x - k`` in float64 with ``k`` the first value of each channel (a constant: the
    gradient is that of the plain mean and variance)."""
    k = x[(0, slice(None)) + (0,) * (x.dim() - 2)].detach().to(_F64)
    var, mean_d = torch.var_mean(x.to(_F64) - k.view(_bshape(x)), _dims(x), correction=0)
    return k + mean_d, var


def composite_transform(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in x's dtype, computed as
    ``(x - hi) * scale + (bias - (mean - hi) * scale)`` with ``hi`` the mean rounded to the
    compute dtype, so the large part of ``x - mean`` is taken exactly."""
    cd = _compute_dtype(x)
    shape = _bshape(x)
    hi = mean.detach().to(cd)
    scale = invstd * _f64(weight, 1.0, invstd)
    offset = _f64(bias, 0.0, invstd) - (mean - hi.to(_F64)) * scale
    y = (x.to(cd) - hi.view(shape)) * scale.to(cd).view(shape) + offset.to(cd).view(shape)
    return y.to(x.dtype)


def composite_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training batch norm: ``(y, mean, var)``, the statistics float64 (C,), var biased."""
    mean, var = composite_stats(x)
    y = composite_transform(x, mean, torch.rsqrt(var + eps), weight, bias)
    return y, mean.detach(), var.detach()


def _one_pass_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, \\*), float64, in one pass: sums of
    ``d = x - k`` and ``d**2`` in float64, ``k`` the first value of each channel.

    ``var = E[d^2] - E[d]^2`` cancels at most a factor ``1 + (mean - k)^2 / var <= N + 1``
    (``k`` is one of the N values, so it lies within ``sqrt(N var)`` of the mean): in float64
    that leaves a relative error under ``N * 1e-16``. Not differentiable by design (the
    gradient is :class:`_InductorTrain`'s)."""
    k = x[(0, slice(None)) + (0,) * (x.dim() - 2)].to(_F64)
    d = x.to(_F64) - k.view(_bshape(x))
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    mean_d = d.sum(_dims(x)) / n
    var = ((d * d).sum(_dims(x)) / n - mean_d * mean_d).clamp_min(0.0)
    return k + mean_d, var


class _InductorTrain(torch.autograd.Function):
    """Training batch norm for ``torch.compile``: the composite algorithm with its gradient
    written out, so that inductor compiles exactly two passes over ``x`` forward (statistics,
    output) and two backward (two sums, ``dx``), as it does for torch's own batch norm.

    Differentiating :func:`composite_train` instead gives the same numbers, but inductor then
    inlines the float64 per-channel chains (``rsqrt(var + eps) * weight`` and the mean's
    correction) into the loop over every element, and recomputes a float64 reduction in the
    backward: a compiled layer's step took 1.1-1.5x the time of torch's compiled layer, and a
    compiled ResNet-18 or MLP training step 1-5 % more. Here the elementwise passes read
    per-channel values of the compute dtype that are also saved for the backward, which makes
    inductor store them once rather than inline them.

    Forward: ``y = ((x - hi) - lo) * scale + bias`` with ``hi`` the float64 mean rounded to
    the compute dtype, ``lo = mean - hi`` (the digits ``hi`` lost), ``scale = rsqrt(var +
    eps) * weight``. Backward, with ``xc = x - mean`` and sums over N and the spatial dims:
    ``dx = scale * (dy - sum(dy)/n) - xc * scale * invstd^2 * sum(dy xc)/n``,
    ``dweight = invstd * sum(dy xc)``, ``dbias = sum(dy)``. Only where no higher derivative,
    forward-mode AD or torch.func transform is needed (those take :func:`composite_train`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, ...]:
        cd, shape = _compute_dtype(x), _bshape(x)
        mean, var = _one_pass_stats(x)
        invstd = torch.rsqrt(var + eps)
        hi = mean.to(cd)
        lo = (mean - hi.to(_F64)).to(cd)
        scale = (invstd if weight is None else invstd * weight.to(_F64)).to(cd)
        y = (x.to(cd) - hi.view(shape) - lo.view(shape)) * scale.view(shape)
        if bias is not None:
            y = y + bias.to(cd).view(shape)
        return y.to(x.dtype), mean, var, hi, lo, scale, invstd.to(cd)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, _ = inputs
        _, mean, var, hi, lo, scale, invstd = output
        ctx.save_for_backward(x, hi, lo, scale, invstd)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, hi, lo, scale, invstd)

    @staticmethod
    def backward(ctx, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, hi, lo, scale, invstd = ctx.saved_tensors
        cd, dims, shape = _compute_dtype(x), _dims(x), _bshape(x)
        n = x.numel() // x.shape[1]
        dyf = dy.to(cd)
        xs = x.to(cd) - hi.view(shape)  # x - mean = xs - lo
        sum_dy = dyf.sum(dims)
        sum_dy_xc = (dyf * xs).sum(dims) - lo * sum_dy
        c1 = -scale * invstd * invstd * sum_dy_xc / n  # dx = scale*dy + c1*xs + c0
        c0 = -scale * sum_dy / n - c1 * lo
        dx = dyf * scale.view(shape) + xs * c1.view(shape) + c0.view(shape)
        dweight = None if ctx.weight_dtype is None else (sum_dy_xc * invstd).to(ctx.weight_dtype)
        dbias = None if ctx.bias_dtype is None else sum_dy.to(ctx.bias_dtype)
        return dx.to(x.dtype), dweight, dbias, None


def inductor_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`composite_train`'s ``(y, mean, var)`` with a once-differentiable gradient that
    inductor compiles as tightly as torch's own batch norm (see :class:`_InductorTrain`)."""
    y, mean, var, *_ = _InductorTrain.apply(x, weight, bias, eps)
    return y, mean, var


def composite_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """Evaluation batch norm: normalized by the running statistics (constants).

    With running statistics (and parameters) of the compute dtype, ``x - running_mean`` is the
    one rounding that matters, and the per-channel factor ``rsqrt(var + eps) * weight`` is
    computed in that dtype, as torch computes it: under torch.compile, inductor inlines these
    per-channel values into the pass over x, where float64 arithmetic per element would cost
    more than the pass (within 3 float32 roundings of the operator's factor, rounded once from
    float64). Otherwise the float64 coefficients of :func:`composite_transform`."""
    cd = _compute_dtype(x)
    if all(t is None or t.dtype == cd for t in (weight, bias, running_mean, running_var)):
        shape = _bshape(x)
        scale = torch.rsqrt(running_var.detach().reshape(-1) + eps)
        if weight is not None:
            scale = scale * weight.reshape(-1)
        y = (x.to(cd) - running_mean.detach().view(shape)) * scale.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        return y.to(x.dtype)
    mean = running_mean.detach().to(_F64).reshape(-1)
    invstd = torch.rsqrt(running_var.detach().to(_F64).reshape(-1) + eps)
    return composite_transform(x, mean, invstd, weight, bias)


def composite_update(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
) -> None:
    """``r <- (1 - rate) r + rate * batch`` in float64 (variance unbiased), without Python
    branches on data: a non-finite batch leaves every buffer as it was through ``where``.

    Written on detached values rather than under ``no_grad``, so that ``torch.export`` sees
    plain in-place updates of the buffers (it lifts them as buffer mutations)."""
    if count == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    mean, var = mean.detach().to(_F64), var.detach().to(_F64)
    # one flag from one sum, as the eager path tests it (two all() reductions would each
    # split inductor's fused loop over the channels)
    finite = torch.isfinite((mean + var).sum())
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        rate: Tensor | float = 1.0 / (num_batches_tracked.detach().to(_F64) + 1.0)
    else:
        rate = float(momentum)
    unbias = count / (count - 1) if count > 1 else float("inf")
    for buf, stat in ((running_mean, mean), (running_var, var * unbias)):
        if buf is not None:
            old = buf.detach().to(_F64)
            buf.copy_(torch.where(finite, old * (1 - rate) + stat.view_as(old) * rate, old))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))


def composite_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    train: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of batch norm in aten ops; with ``train`` the statistics are the
    batch's (recomputed around ``mean`` as a constant shift), else constants."""
    cd = _compute_dtype(x)
    dims, shape = _dims(x), _bshape(x)
    xs = x.to(cd) - mean.detach().to(cd).view(shape)
    dyf = dy.to(cd)
    if train:
        xc = xs - xs.mean(dims, keepdim=True)
        invstd = torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
        xhat = xc * invstd
    else:
        invstd = torch.rsqrt(var.detach().to(_F64) + eps).to(cd).view(shape)
        xhat = xs * invstd
    g = dyf if weight is None else dyf * weight.to(cd).view(shape)
    if train:
        dx = invstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    else:
        dx = g * invstd
    ptype = x.dtype if weight is None else weight.dtype
    return dx.to(x.dtype), (dyf * xhat).sum(dims).to(ptype), dyf.sum(dims).to(ptype)


# ---- loading the extension, or defining the operators here -----------------------------------


def _load_extension() -> bool:
    """Import ``bnorm._C`` (which registers the operators); warn and return False where it is
    missing. ``BNORM_NO_EXTENSION=1`` behaves as if it were missing (tests of that path)."""
    try:
        if os.environ.get("BNORM_NO_EXTENSION") == "1":
            raise ImportError("BNORM_NO_EXTENSION=1")
        from . import _C  # noqa: F401
    except ImportError as error:
        warnings.warn(
            f"bnorm's C++ operators are not built ({error}); every layer runs on the composite "
            "path (the same results, slower). Build them from the source tree with "
            "`pip install torch==2.13.0 setuptools && pip install --no-build-isolation -e .`",
            ExtensionWarning,
            stacklevel=3,
        )
        return False
    return True


#: True where the C++ extension is loaded; False where the operators run the composite path.
EXTENSION: bool = _load_extension()


def _out_like(x: Tensor) -> Tensor:
    """An empty output as the CPU kernels make it: x's layout if contiguous or
    channels_last(_3d), else contiguous."""
    dense = (
        x.is_contiguous()
        or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
    )
    if dense:
        return torch.empty_like(x)
    return x.new_empty(x.shape)


def _per_channel_out(x: Tensor, dtype: torch.dtype = _F64) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=dtype)


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("bnorm::stats")
    def _stats(input):
        return _per_channel_out(input), _per_channel_out(input)

    @reg("bnorm::transform")
    def _transform(input, mean, invstd, weight, bias):
        return _out_like(input)

    @reg("bnorm::backward_reduce")
    def _reduce(grad_out, input, mean):
        return _per_channel_out(input), _per_channel_out(input)

    @reg("bnorm::backward_elemt")
    def _elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        return _out_like(input)

    @reg("bnorm::batch_norm_train")
    def _train(input, weight, bias, eps):
        return _out_like(input), _per_channel_out(input), _per_channel_out(input)

    @reg("bnorm::batch_norm_eval")
    def _eval(input, weight, bias, running_mean, running_var, eps):
        return _out_like(input)

    @reg("bnorm::batch_norm_backward")
    def _backward(grad_out, input, weight, mean, var, eps, train, output_mask):
        ptype = input.dtype if weight is None else weight.dtype
        return _out_like(input), _per_channel_out(input, ptype), _per_channel_out(input, ptype)

    @reg("bnorm::update_running_stats_")
    def _update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        return None


def _define_composite_library() -> torch.library.Library:
    """The operators without the extension: the same schemas, the composite kernels."""
    lib = torch.library.Library("bnorm", "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)

    def stats(input):
        mean, var = composite_stats(input)
        return mean.detach(), var.detach()

    def backward_reduce(grad_out, input, mean):
        d = grad_out.to(_F64)
        xmu = input.to(_F64) - mean.to(_F64).view(_bshape(input))
        return d.sum(_dims(input)), (d * xmu).sum(_dims(input))

    def backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        shape = _bshape(input)
        a = _f64(weight, 1.0, invstd) * invstd
        b = -a * invstd * invstd * sum_dy_xmu / count
        c = -a * sum_dy / count
        xmu = input.to(_F64) - mean.to(_F64).view(shape)
        dx = grad_out.to(_F64) * a.view(shape) + xmu * b.view(shape) + c.view(shape)
        return dx.to(input.dtype)

    def backward(grad_out, input, weight, mean, var, eps, train, output_mask):
        return composite_backward(grad_out, input, weight, mean, var, eps, train)

    def batch_norm(
        input, weight, bias, running_mean, running_var, num_batches_tracked, use_batch_stats,
        momentum, eps,
    ):  # fmt: skip
        if not use_batch_stats:
            if running_mean is None or running_var is None:
                raise ValueError("running_mean and running_var must be defined in evaluation mode")
            return composite_eval(input, weight, bias, running_mean, running_var, eps)
        y, mean, var = composite_train(input, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            count = input.numel() // input.shape[1] if input.shape[1] else 0
            composite_update(
                running_mean, running_var, num_batches_tracked, mean, var, count, momentum
            )
        return y

    kernels = {
        "stats": stats,
        "transform": composite_transform,
        "backward_reduce": backward_reduce,
        "backward_elemt": backward_elemt,
        "batch_norm_train": composite_train,
        "batch_norm_eval": composite_eval,
        "batch_norm_backward": backward,
        "update_running_stats_": composite_update,
        "batch_norm": batch_norm,
    }
    for name, fn in kernels.items():
        lib.impl(name, fn, "CompositeImplicitAutograd")
    return lib


if EXTENSION:
    _register_fakes()
    from ._C import eval_call as eval_call
    from ._C import nonfinite_skips as nonfinite_skips
else:
    _LIBRARY = _define_composite_library()  # kept alive: the registrations last as long as it

    def nonfinite_skips() -> int:
        """The extension's count of skipped updates (the composite path does not count)."""
        return 0


_ops = torch.ops.bnorm


# ---- the four steps (SyncBatchNorm and the remedies compose them) ----------------------------


def statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, \\*): float64 (C,) tensors."""
    return _ops.stats.default(x)


def transform(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``y = (x - mean) * invstd * weight + bias`` in x's dtype and layout."""
    return _ops.transform.default(x, mean, invstd, weight, bias)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum dy, sum dy * (x - mean))`` per channel, float64 (C,)."""
    return _ops.backward_reduce.default(dy, x, mean)


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
    """The input gradient of training-mode batch norm from the reductions of
    :func:`backward_reduce` (over ``count`` values per channel, all processes together):
    ``dx = a dy + b (x - mean) + c`` with ``a = weight * invstd``,
    ``b = -a invstd^2 sum_dy_xmu / count`` and ``c = -a sum_dy / count``."""
    return _ops.backward_elemt.default(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
