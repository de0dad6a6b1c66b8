r"""Batch Renormalization (Ioffe 2017): batch norm that stays right for small or non-i.i.d. batches.

Training normalizes with the batch's statistics and then corrects towards the running ones,

.. math::

    y = \gamma\left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta, \qquad
    r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\!\left(\frac{\sigma_B}{\sigma}\right), \qquad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\!\left(\frac{\mu_B - \mu}{\sigma}\right),

with :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}` (biased), :math:`\mu = ` running mean,
:math:`\sigma = \sqrt{\text{running var} + \epsilon}` taken *before* this batch updates them, and r,
d treated as constants by the backward (``stop_gradient`` in the paper). Without the clipping,
training output would equal evaluation output exactly; the clipping keeps the first steps,
when the running statistics are still poor, close to plain batch norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .._remedies_common import as_supported_layout, layout_of, values_per_channel
from ..functional import batch_norm_unchecked, composite_wanted, update_running_stats
from .batchnorm import _BatchNormBase

__all__ = [
    "PAPER_D_MAX",
    "PAPER_R_MAX",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "batch_renorm",
    "linear_ramp",
]

Schedule = float | str | Callable[[int], float]


def linear_ramp(
    start: float, end: float, first_step: int, last_step: int
) -> Callable[[int], float]:
    """A schedule: ``start`` until ``first_step``, then linear to ``end`` at ``last_step``, then
    ``end``. The step is the number of training batches seen before the current one."""
    if last_step <= first_step:
        raise ValueError(
            f"linear_ramp: last_step ({last_step}) must exceed first_step ({first_step})"
        )

    def schedule(step: int) -> float:
        frac = min(max((step - first_step) / (last_step - first_step), 0.0), 1.0)
        return start + (end - start) * frac

    schedule.__qualname__ = f"linear_ramp({start}, {end}, {first_step}, {last_step})"
    return schedule


# The paper's ImageNet schedule (Ioffe 2017, section 4.1): plain batch norm (r_max = 1,
# d_max = 0) for the first 5000 steps, then relaxed linearly to r_max = 3 at step 40000 and
# d_max = 5 at step 25000.
PAPER_R_MAX = linear_ramp(1.0, 3.0, 5_000, 40_000)
PAPER_D_MAX = linear_ramp(0.0, 5.0, 5_000, 25_000)
_NAMED = {"r_max": {"paper": PAPER_R_MAX}, "d_max": {"paper": PAPER_D_MAX}}


def _resolve(layer: str, which: str, value: Schedule) -> float | Callable[[int], float]:
    if isinstance(value, str):
        if value not in _NAMED[which]:
            raise ValueError(
                f"{layer}: unknown {which} schedule {value!r}; known: {sorted(_NAMED[which])}"
            )
        return _NAMED[which][value]
    if callable(value):
        return value
    return _check_limit(layer, which, float(value))


def _check_limit(layer: str, which: str, value: float) -> float:
    low = 1.0 if which == "r_max" else 0.0
    if not value >= low:  # also rejects NaN
        raise ValueError(f"{layer}: {which} must be >= {low:g}, got {value}")
    return value


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    r_max: float,
    d_max: float,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
    on_nonfinite: str = "warn",
    layer: str = "batch_renorm",
) -> Tensor:
    r"""Training-mode Batch Renormalization of a checked input ``x`` (N, C, \*); see the module
    docstring for the equation. Updates ``running_mean``/``running_var`` in place like batch
    norm (PyTorch's momentum, unbiased variance) *after* r and d were taken from them."""
    x = as_supported_layout(x)
    count = values_per_channel(x)
    if count == 0:  # nothing to renormalize: batch norm's empty-batch behaviour
        return batch_norm_unchecked(
            x, running_mean, running_var, weight, bias, use_batch_stats=True,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
            on_nonfinite=on_nonfinite, layer=layer,
        )  # fmt: skip
    # Under torch.compile/export, torch.func and forward-mode AD: aten ops throughout (inductor
    # fuses them; forward AD gets its tangent from them), the statistics differentiable.
    composite = composite_wanted()
    if composite:
        mean, var = ops.composite_stats(x)
    else:
        with torch.no_grad():
            mean, var = ops.statistics(x.detach())
    with torch.no_grad():
        sigma = torch.sqrt(running_var.detach().to(torch.float64) + eps)
        r = torch.clamp(torch.sqrt(var.detach() + eps) / sigma, 1.0 / r_max, r_max)
        d = torch.clamp(
            (mean.detach() - running_mean.detach().to(torch.float64)) / sigma, -d_max, d_max
        )
    # r and d are taken from the running statistics before this batch moves them (Algorithm 1).
    update_running_stats(
        running_mean, running_var, mean.detach(), var.detach(), count, momentum,
        num_batches_tracked, on_nonfinite, layer,
    )  # fmt: skip
    if composite:
        scale, shift = _affine(weight, bias, r, d)  # differentiable in γ and β
        return ops.composite_transform(x, mean, torch.rsqrt(var + eps), scale, shift)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _BatchRenormFunction.apply(x, weight, bias, mean, var, r, d, eps)
    scale, shift = _affine(weight, bias, r, d)
    return ops.transform(x, mean, torch.rsqrt(var + eps), scale, shift)


def _affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    """With r, d fixed, renorm is batch norm with scale γ·r and shift γ·d + β (float64;
    differentiable in γ and β where autograd records)."""
    g = r.new_ones(r.shape) if weight is None else weight.to(torch.float64)
    b = r.new_zeros(r.shape) if bias is None else bias.to(torch.float64)
    return g * r, g * d + b


class _BatchRenormFunction(torch.autograd.Function):
    """``y = γ(x̂ r + d) + β`` with r, d constant; backward by bnorm's batch-norm operators,
    or, when a second derivative is asked for, by a differentiable graph of aten ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, r, d, eps):  # type: ignore[override]
        invstd = torch.rsqrt(var + eps)
        scale, shift = _affine(weight, bias, r, d)
        ctx.save_for_backward(x, weight, bias, mean, var, invstd, r, d, scale)
        ctx.eps = eps
        return ops.transform(x, mean, invstd, scale, shift)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, mean, var, invstd, r, d, scale = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or composite_wanted():
            # create_graph (or vmap over the backward): the same gradient as aten ops of x, γ
            # and dy (the statistics recomputed from x around the saved mean), which can be
            # differentiated again and batched
            scale_of = _affine(weight, None, r, d)[0]  # γ·r, differentiable in γ
            dx, sum_dy_xhat, sum_dy = ops.composite_backward(
                dy, x, scale_of, mean, var, ctx.eps, train=True
            )
        else:
            dy = dy.contiguous(memory_format=layout_of(x))
            sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
            # x̂·r with r constant: plain batch norm's input gradient with the scale γ·r.
            dx = ops.backward_elementwise(
                dy, x, mean, invstd, scale, sum_dy, sum_dy_xmu, values_per_channel(x)
            )
            sum_dy_xhat = sum_dy_xmu * invstd
        # ∂L/∂γ = Σ dy·(x̂ r + d) = r·Σ dy·x̂ + d·Σ dy;  ∂L/∂β = Σ dy.
        dweight = (r * sum_dy_xhat + d * sum_dy).to(weight.dtype) if need_w else None
        dbias = sum_dy.to(bias.dtype) if need_b else None
        return (dx if need_x else None), dweight, dbias, None, None, None, None, None


# One operator for the tools that record a layer as one node (TorchScript, jit.trace, FX):
# its kernel is batch_renorm above, as aten and bnorm operators (CompositeImplicitAutograd).
_LIBRARY = torch.library.Library("bnorm", "FRAGMENT")
_LIBRARY.define(
    "batch_renorm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
    "Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float r_max, float d_max, "
    "float? momentum, float eps) -> Tensor"
)


def _batch_renorm_kernel(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    r_max: float,
    d_max: float,
    momentum: float | None,
    eps: float,
) -> Tensor:
    return batch_renorm(
        input, running_mean, running_var, weight, bias, r_max=r_max, d_max=d_max,
        momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
    )  # fmt: skip


_LIBRARY.impl("batch_renorm", _batch_renorm_kernel, "CompositeImplicitAutograd")


_RENORM_DOC = r"""

    Training (see :mod:`bnorm.modules.renorm` for the equation):
    ``y = γ·((x − μ_B)/σ_B · r + d) + β``, with ``r = clip(σ_B/σ, 1/r_max, r_max)`` and
    ``d = clip((μ_B − μ)/σ, −d_max, d_max)`` computed from the running statistics *before* this
    batch updates them, and held constant in the backward. The running statistics are updated
    exactly as batch norm's (``momentum`` is PyTorch's update rate, ``None`` the cumulative
    average; the running variance is unbiased). ``r_max=1, d_max=0`` is batch norm exactly.
    Evaluation is batch norm's evaluation (running statistics); ``state_dict`` keys are
    ``BatchNormXd``'s, and ``isinstance(layer, torch.nn.BatchNormXd)`` holds, so checkpoints,
    :func:`bnorm.freeze` and :func:`bnorm.precise_bn` work unchanged.

    Args:
        num_features: the number of channels ``C``.
        eps: added to the variances; positive. Default 1e-5.
        momentum: update rate of the running statistics, or ``None`` (cumulative average).
        affine: learn γ (init 1) and β (init 0).
        r_max, d_max: the clipping limits. A number (``r_max >= 1``, ``d_max >= 0``) holds from
            the first step. ``"paper"`` is Ioffe's schedule (plain BN for 5000 steps, then
            ``r_max`` linear 1 → 3 by step 40000 and ``d_max`` 0 → 5 by step 25000;
            :data:`PAPER_R_MAX`, :data:`PAPER_D_MAX`). A callable ``f(step) -> float`` gives your
            own (see :func:`linear_ramp`). The step is ``num_batches_tracked`` before the
            batch (0 for the first), so a schedule resumes where it was after
            ``load_state_dict``; the schedule itself is a constructor argument, not state.
        device, dtype: where and in what dtype to create parameters and buffers.
        bias, on_nonfinite, small_batch: as :class:`bnorm.BatchNorm2d` (keyword only).

    The running statistics are required (there is no ``track_running_stats=False``: r and d
    are defined by them). Derivatives of every order (double backward, forward-mode AD) treat
    r and d as constants, as the paper's backward does.
"""


class _BatchRenormBase(_BatchNormBase):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: Schedule = 3.0,
        d_max: Schedule = 5.0,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        name = f"{type(self).__name__}({num_features})"
        if not kwargs.pop("track_running_stats", True):
            raise ValueError(
                f"{name}: Batch Renormalization needs running statistics (r and d are defined "
                f"by them); track_running_stats=False is not supported"
            )
        self._r_max = _resolve(name, "r_max", r_max)
        self._d_max = _resolve(name, "d_max", d_max)
        # the limits as numbers for the one-operator path (TorchScript compiles floats, not
        # callables); NaN where a schedule gives them
        self._r_limit = float("nan") if callable(self._r_max) else self._r_max
        self._d_limit = float("nan") if callable(self._d_max) else self._d_max
        self._label = name  # for that path's message (TorchScript cannot call _layer_name)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, **kwargs)

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max, d_max)`` at ``step`` (default: the next training batch's step)."""
        scheduled = callable(self._r_max) or callable(self._d_max)
        if step is None and scheduled:  # read the counter only for a schedule (it syncs)
            step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        r = self._r_max(step) if callable(self._r_max) else self._r_max
        d = self._d_max(step) if callable(self._d_max) else self._d_max
        name = self._layer_name()
        return _check_limit(name, "r_max", float(r)), _check_limit(name, "d_max", float(d))

    def _normalize(self, input: Tensor) -> Tensor:
        """The eager call (batch norm's :meth:`forward` routes to it): renormalization in
        training, batch norm in evaluation and for a batch of one."""
        if not self.training or self._uses_running_stats_for(input):
            return super()._normalize(input)
        self._check_input(input, True)
        r_max, d_max = self.limits()  # checked before any state changes
        return batch_renorm(
            input,
            self.running_mean,
            self.running_var,  # type: ignore[arg-type]
            self.weight,
            self.bias,
            r_max=r_max,
            d_max=d_max,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked,
            on_nonfinite=self.on_nonfinite,
            layer=self._layer_name(),
        )

    def _one_node(self, input: Tensor) -> Tensor:
        """The layer as one operator (TorchScript, jit.trace, FX): batch norm's (``_op_forward``)
        in evaluation, ``torch.ops.bnorm.batch_renorm`` in training. Scheduled limits are
        Python functions of the step, which a recorded graph cannot follow: they raise here."""
        if not self.training:
            return self._op_forward(input)  # batch norm's evaluation
        if math.isnan(self._r_limit) or math.isnan(self._d_limit):
            raise RuntimeError(
                self._label
                + ": r_max/d_max follow a schedule (a Python function of the step), which "
                "TorchScript, jit.trace and FX cannot record in training mode; give numbers "
                "(e.g. the schedule's final values) to script or trace a training graph"
            )
        return torch.ops.bnorm.batch_renorm(
            input, self.weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked, self._r_limit, self._d_limit, self.momentum, self.eps,
        )  # fmt: skip

    def extra_repr(self) -> str:
        def text(v: object) -> str:
            for which in _NAMED.values():
                for key, f in which.items():
                    if v is f:
                        return repr(key)
            return getattr(v, "__qualname__", repr(v)) if callable(v) else repr(v)

        return f"{super().extra_repr()}, r_max={text(self._r_max)}, d_max={text(self._d_max)}"


class BatchRenorm1d(_BatchRenormBase, torch.nn.BatchNorm1d):
    __doc__ = "Batch Renormalization over (N, C) or (N, C, L) input." + _RENORM_DOC
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenormBase, torch.nn.BatchNorm2d):
    __doc__ = "Batch Renormalization over (N, C, H, W) input (channels_last kept)." + _RENORM_DOC
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchRenorm3d(_BatchRenormBase, torch.nn.BatchNorm3d):
    __doc__ = "Batch Renormalization over (N, C, D, H, W) input." + _RENORM_DOC
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
