r"""Batch norm followed by an activation in one layer, optionally keeping only its output.

.. math::

    z = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad y = \phi(z),

with :math:`\phi` one of ``relu``, ``leaky_relu`` (slope ``negative_slope``), ``elu``
(``alpha``) or ``identity``.

**Memory** (In-Place ABN, Rota Bulò, Porzi & Kontschieder 2018). Plain batch norm + activation
keeps two tensors of the input's size for the backward: batch norm's input ``x`` and the
activation's input or output. With ``memory_efficient=True`` the layer keeps only its output
``y`` (and per-channel vectors), and the backward recomputes what it needs from ``y``:

.. math::

    z = \phi^{-1}(y), \qquad dz = dy\cdot\phi'(z), \qquad \hat x = \frac{z - \beta}{\gamma},
    \qquad dx = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}\left(dz - \overline{dz}
        - \hat x\,\overline{dz\,\hat x}\right),

bars being channel means (the batch-norm backward written in :math:`\hat x`, which the forward
never needs to store). That needs an invertible activation (ReLU maps every negative value to
0 and is refused) and :math:`\gamma \ne 0`. The gradients are those of the plain layer, up to
rounding (the recovered :math:`\hat x` carries the rounding of y and of the inversion).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops
from .._remedies_common import (
    as_supported_layout,
    layout_of,
    per_channel,
    reduce_dims,
    values_per_channel,
)
from ..functional import update_running_stats
from .batchnorm import _BatchNormBase

__all__ = ["ACTIVATIONS", "BatchNormAct1d", "BatchNormAct2d", "batch_norm_act_memory_efficient"]

ACTIVATIONS = ("relu", "leaky_relu", "elu", "identity")
INVERTIBLE = ("leaky_relu", "elu", "identity")


def activation_(z: Tensor, act: str, negative_slope: float, alpha: float) -> Tensor:
    """Apply the activation to ``z`` in place (z is a fresh tensor nobody else holds)."""
    if act == "relu":
        return z.relu_()
    if act == "leaky_relu":
        return F.leaky_relu_(z, negative_slope)
    if act == "elu":
        return F.elu_(z, alpha)
    return z


def invert_activation(
    y: Tensor, dy: Tensor, act: str, negative_slope: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """``(z, dz)``: the activation's input recovered from its output ``y``, and the gradient
    ``dy * act'(z)`` (see :func:`bnorm.reference_remedies.act_inverse`). ``z`` is always a new
    tensor (the caller may overwrite it); ``dz`` may be ``dy`` itself."""
    if act == "leaky_relu":
        neg = y < 0
        return torch.where(neg, y / negative_slope, y), torch.where(neg, dy * negative_slope, dy)
    if act == "elu":
        pos = y > 0
        # y > -alpha for every finite z; the clamp only guards log1p(-1) = -inf after rounding
        ratio = torch.clamp(y / alpha, min=-1.0 + torch.finfo(y.dtype).eps)
        return torch.where(pos, y, torch.log1p(ratio)), torch.where(pos, dy, dy * (y + alpha))
    if act == "identity":
        return y.clone(), dy
    raise ValueError(f"activation {act!r} cannot be inverted")


def affine_act_(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    act: str,
    negative_slope: float,
    alpha: float,
) -> Tensor:
    """``x <- act((x - mean) * invstd * weight + bias)`` in x's own memory (In-Place ABN).

    Computed as ``(x - k) * scale + offset`` with ``k`` the mean rounded to x's dtype, like
    the kernels' transform, so the large part of ``x - mean`` is taken exactly.
    """
    g = invstd.new_ones(invstd.shape) if weight is None else weight.detach().double()
    b = invstd.new_zeros(invstd.shape) if bias is None else bias.detach().double()
    if x.dtype in (torch.float32, torch.float64):
        k = mean.to(x.dtype)
        scale = invstd * g
        offset = b - (mean - k.double()) * scale
        x.sub_(per_channel(k, x)).mul_(per_channel(scale.to(x.dtype), x))
        x.add_(per_channel(offset.to(x.dtype), x))
    else:  # bf16/fp16: compute in fp32 as the kernels do, then store
        x.copy_(ops.transform(x, mean, invstd, weight, bias))
    return activation_(x, act, negative_slope, alpha)


class _BatchNormActFunction(torch.autograd.Function):
    """``y = act(transform(x))`` saving only ``y``; the backward recovers ``x̂`` from ``y``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x,
        weight,
        bias,
        mean,
        invstd,
        use_batch_stats,
        act,
        negative_slope,
        alpha,
        inplace,
    ):
        if inplace:
            y = affine_act_(x, mean, invstd, weight, bias, act, negative_slope, alpha)
            ctx.mark_dirty(x)
        else:
            z = ops.transform(x, mean, invstd, weight, bias)
            y = activation_(z, act, negative_slope, alpha)
        ctx.save_for_backward(y, weight, bias, invstd)
        ctx.config = (use_batch_stats, act, negative_slope, alpha)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        y, weight, bias, invstd = ctx.saved_tensors
        use_batch_stats, act, negative_slope, alpha = ctx.config
        cd = torch.float64 if y.dtype == torch.float64 else torch.float32
        dy = dy.contiguous(memory_format=layout_of(y)).to(cd)
        z, dz = invert_activation(y.to(cd), dy, act, negative_slope, alpha)
        g = invstd.new_ones(invstd.shape) if weight is None else weight.detach().double()
        b = invstd.new_zeros(invstd.shape) if bias is None else bias.detach().double()
        # x̂ = (z − β)/γ, in place in z: the backward's temporaries are what the peak memory
        # of a memory-efficient network is made of, so each full-size tensor is made once.
        xhat = z.sub_(per_channel(b.to(cd), z)).mul_(per_channel((1.0 / g).to(cd), z))
        dims = reduce_dims(xhat)
        sum_dz = dz.sum(dims, dtype=torch.float64)
        sum_dz_xhat = (dz * xhat).sum(dims, dtype=torch.float64)
        a = g * invstd
        dx = None
        if ctx.needs_input_grad[0]:
            if use_batch_stats:
                # dx = γ·invstd·(dz − mean(dz) − x̂·mean(dz·x̂))
                count = values_per_channel(xhat)
                dx = dz - per_channel((sum_dz / count).to(cd), xhat)
                dx.addcmul_(xhat, per_channel((sum_dz_xhat / count).to(cd), xhat), value=-1.0)
                del xhat
                dx.mul_(per_channel(a.to(cd), dx))
            else:  # fixed statistics: dx = γ·invstd·dz
                dx = dz * per_channel(a.to(cd), dz)
            dx = dx.to(y.dtype)
        dweight = sum_dz_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sum_dz.to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None, None, None, None


def batch_norm_act_memory_efficient(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    use_batch_stats: bool,
    act: str,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    on_nonfinite: str = "warn",
    layer: str = "batch_norm_act",
    inplace: bool = False,
) -> Tensor:
    r"""Batch norm + invertible activation of a checked, non-empty input (N, C, \*) whose
    autograd graph keeps only the output. In training (``use_batch_stats``) the running
    statistics, if given, are updated as :func:`bnorm.functional.batch_norm` does.
    ``inplace=True`` writes the output into ``x`` (which must not be a leaf requiring grad)
    and returns it."""
    if inplace and x.is_leaf and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{layer}: inplace=True overwrites its input, which cannot be a leaf tensor that "
            f"requires grad (got one of shape {tuple(x.shape)}); use inplace=False here"
        )
    x = as_supported_layout(x)
    if use_batch_stats:
        with torch.no_grad():
            mean, var = ops.statistics(x.detach())
        if running_mean is not None or running_var is not None:
            update_running_stats(
                running_mean, running_var, mean, var, values_per_channel(x), momentum,
                num_batches_tracked, on_nonfinite, layer,
            )  # fmt: skip
    else:
        assert running_mean is not None and running_var is not None
        mean, var = running_mean.detach().double(), running_var.detach().double()
    invstd = torch.rsqrt(var + eps)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _BatchNormActFunction.apply(
            x,
            weight,
            bias,
            mean,
            invstd,
            use_batch_stats,
            act,
            negative_slope,
            alpha,
            inplace,
        )
    if inplace:
        return affine_act_(x, mean, invstd, weight, bias, act, negative_slope, alpha)
    return activation_(ops.transform(x, mean, invstd, weight, bias), act, negative_slope, alpha)


_ACT_DOC = r"""

    ``y = act(BN(x))`` with ``act`` in ``"relu"``, ``"leaky_relu"`` (``negative_slope``,
    default 0.01), ``"elu"`` (``alpha``, default 1.0) or ``"identity"``. Batch norm is bnorm's
    (training/evaluation, momentum, unbiased running variance, ``small_batch`` and the NaN guard
    as in :class:`bnorm.BatchNorm2d`), and the ``state_dict`` keys are exactly batch norm's, so
    plain batch-norm weights load into it and back (the activation is a setting, not state).

    ``memory_efficient=True`` keeps only the output for the backward (In-Place ABN; see
    :mod:`bnorm.modules.act`): the input of the layer is freed after the forward, and the
    backward recomputes ``x̂`` from ``y``. It needs an invertible activation: ``leaky_relu``
    (slope > 0), ``elu`` (alpha > 0) or ``identity``; ``relu`` is refused. The weight γ must
    have no zero while gradients are computed (x̂ = (z − β)/γ); a small |γ| costs precision.
    Double backward is not supported in this mode. Gradients equal the plain layer's.
    ``inplace=True`` (with ``memory_efficient=True``) also writes the output into the input's
    memory, as In-Place ABN does, so the forward allocates nothing of the input's size: the
    input must then not be used anywhere else (e.g. by a residual connection), exactly as
    with ``torch.nn.ReLU(inplace=True)``; a leaf input that requires grad is refused.

    Args:
        num_features: the number of channels ``C``.
        act: the activation.
        memory_efficient: keep only the output for the backward.
        eps, momentum, affine, track_running_stats, device, dtype: as
            :class:`bnorm.BatchNorm2d` (keyword only).
        negative_slope, alpha: the activation's parameters (keyword only).
        inplace: overwrite the input with the output (keyword only; needs memory_efficient).
        bias, on_nonfinite, small_batch: as :class:`bnorm.BatchNorm2d` (keyword only).
"""


class _BatchNormActBase(_BatchNormBase):
    # bnorm.freeze leaves this layer alone: a frozen batch norm would drop the activation.
    _bnorm_freezable = False

    def __init__(
        self,
        num_features: int,
        act: str = "relu",
        memory_efficient: bool = False,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        inplace: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        name = f"{type(self).__name__}({num_features})"
        if inplace and not memory_efficient:
            raise ValueError(f"{name}: inplace=True is part of memory_efficient=True; set both")
        if act not in ACTIVATIONS:
            raise ValueError(f"{name}: act must be one of {ACTIVATIONS}, got {act!r}")
        if memory_efficient and act not in INVERTIBLE:
            raise ValueError(
                f"{name}: memory_efficient=True needs an invertible activation, and relu is not "
                f"(it maps every negative input to 0, so the backward cannot recover it from "
                f"the output). Use act='leaky_relu' (e.g. negative_slope=0.01), act='elu', "
                f"act='identity', or memory_efficient=False."
            )
        if memory_efficient and act == "leaky_relu" and not negative_slope > 0:
            raise ValueError(
                f"{name}: memory_efficient=True needs negative_slope > 0 to invert leaky_relu, "
                f"got {negative_slope}"
            )
        if act == "elu" and not alpha > 0:
            raise ValueError(f"{name}: elu needs alpha > 0, got {alpha}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.act = act
        self.memory_efficient = bool(memory_efficient)
        self.inplace = bool(inplace)
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)

    def forward(self, input: Tensor) -> Tensor:
        if not self.memory_efficient or values_per_channel(input) == 0:
            # Plain: bnorm's batch norm, then the activation in place on its fresh output
            # (batch norm keeps its input, not its output, for the backward).
            return activation_(super().forward(input), self.act, self.negative_slope, self.alpha)
        fallback = self._uses_running_stats_for(input)
        use_batch_stats = (self.training or self.running_mean is None) and not fallback
        self._check_input(input, use_batch_stats)
        if self.weight is not None and torch.is_grad_enabled() and bool((self.weight == 0).any()):
            raise ValueError(
                f"{self._layer_name()}: memory_efficient=True recovers x̂ = (z − β)/γ in the "
                f"backward, so weight must have no zero; channels "
                f"{torch.nonzero(self.weight == 0).flatten().tolist()} are 0"
            )
        update = self.training and self.track_running_stats and not fallback
        return batch_norm_act_memory_efficient(
            input,
            self.running_mean if update or not use_batch_stats else None,
            self.running_var if update or not use_batch_stats else None,
            self.weight,
            self.bias,
            use_batch_stats=use_batch_stats,
            act=self.act,
            negative_slope=self.negative_slope,
            alpha=self.alpha,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if update else None,
            on_nonfinite=self.on_nonfinite,
            layer=self._layer_name(),
            inplace=self.inplace,
        )

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, act={self.act!r}"
        if self.act == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        if self.act == "elu":
            text += f", alpha={self.alpha}"
        if self.memory_efficient:
            text += ", memory_efficient=True"
        if self.inplace:
            text += ", inplace=True"
        return text


class BatchNormAct1d(_BatchNormActBase, torch.nn.BatchNorm1d):
    __doc__ = "Batch norm + activation over (N, C) or (N, C, L) input." + _ACT_DOC
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNormAct2d(_BatchNormActBase, torch.nn.BatchNorm2d):
    __doc__ = "Batch norm + activation over (N, C, H, W) input (channels_last kept)." + _ACT_DOC
    _ranks = (4,)
    _layout = "(N, C, H, W)"
