r"""Batch norm followed by an activation in one layer (timm's ``BatchNormAct2d`` interface),
optionally keeping only its output.

.. math::

    z = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta,
    \qquad y = \phi(\mathrm{drop}(z)),

with :math:`\phi` any activation module (``.act``) and ``drop`` an optional module (``.drop``,
e.g. DropBlock), exactly as timm's ``BatchNormAct2d`` computes it. The batch norm is bnorm's
(one call to :func:`bnorm.functional.batch_norm_unchecked`, the computation bnorm's
``BatchNorm2d`` runs); the activation is then applied as a module call on batch norm's fresh
output (in place when ``inplace=True``, which is safe there: batch norm keeps its input, not its
output, for the backward). No activation is fused into the batch-norm kernel.

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
rounding (the recovered :math:`\hat x` carries the rounding of y and of the inversion). This
path uses only the step operators (``bnorm.ops.statistics/transform``) and
:func:`bnorm.functional.update_running_stats`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d
from .sync import SyncBatchNorm

__all__ = [
    "ACTIVATIONS",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d",
    "SyncBatchNormAct",
    "batch_norm_act_memory_efficient",
    "create_act",
    "get_act_layer",
]

# Activation names, as timm's get_act_layer spells them, to torch modules. Each is built as
# ``layer(inplace=inplace, **kwargs)``, or without ``inplace`` where the module has none.
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "celu": nn.CELU,
    "selu": nn.SELU,
    "prelu": nn.PReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "hard_sigmoid": nn.Hardsigmoid,
    "hardsigmoid": nn.Hardsigmoid,
    "hard_swish": nn.Hardswish,
    "hardswish": nn.Hardswish,
    "identity": nn.Identity,
}
# The activations memory_efficient=True can invert from their output (see invert_activation).
INVERTIBLE = ("leaky_relu", "elu", "identity")


def get_act_layer(name: str | Callable[..., nn.Module] | None) -> Callable[..., nn.Module] | None:
    """The activation class (or factory) for ``name``, as timm's ``get_act_layer``: a string
    from :data:`ACTIVATIONS` (case-insensitive), a module class or any callable returning a
    module (returned as is), or ``None``/``""`` for no activation."""
    if name is None or (isinstance(name, str) and not name):
        return None
    if not isinstance(name, str):
        return name
    layer = ACTIVATIONS.get(name.lower())
    if layer is None:
        raise ValueError(
            f"act must be one of {sorted(ACTIVATIONS)}, an nn.Module class or a callable "
            f"returning a module; got {name!r}"
        )
    return layer


def create_act(
    act_layer: str | Callable[..., nn.Module] | nn.Module | None,
    act_kwargs: dict[str, Any] | None = None,
    inplace: bool = True,
    apply_act: bool = True,
) -> nn.Module:
    """The activation module a norm-act layer holds as ``.act`` (timm's ``_create_act``):
    ``nn.Identity()`` when ``apply_act`` is false or there is no activation, an ``nn.Module``
    instance as given, else ``act_layer(inplace=inplace, **act_kwargs)`` (without ``inplace``
    for modules that take none)."""
    if not apply_act:
        return nn.Identity()
    if isinstance(act_layer, nn.Module):
        return act_layer
    layer = get_act_layer(act_layer)
    if layer is None:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    kwargs.setdefault("inplace", inplace)
    try:
        return layer(**kwargs)
    except TypeError:
        kwargs.pop("inplace")
        return layer(**kwargs)


def invertible_spec(act: nn.Module) -> tuple[str, float, float] | None:
    """``(name, negative_slope, alpha)`` of an activation the memory-efficient backward can
    invert (exact classes ``nn.LeakyReLU`` with slope > 0, ``nn.ELU`` with alpha > 0,
    ``nn.Identity``), else ``None``."""
    kind = type(act)
    if kind is nn.Identity:
        return ("identity", 0.01, 1.0)
    if kind is nn.LeakyReLU and act.negative_slope > 0:
        return ("leaky_relu", float(act.negative_slope), 1.0)
    if kind is nn.ELU and act.alpha > 0:
        return ("elu", 0.01, float(act.alpha))
    return None


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

    ``y = act(drop(BN(x)))``, timm's ``BatchNormAct2d`` with bnorm's batch norm: the same
    constructor (positional ``num_features, eps, momentum, affine, track_running_stats``, then
    ``apply_act, act_layer, act_kwargs, inplace, drop_layer, device, dtype``), the same
    attributes (``.act`` and ``.drop`` are modules) and the same ``state_dict`` keys, which are
    plain batch norm's (plus any parameters of the activation, e.g. PReLU's ``act.weight``), so
    timm's, torch's and bnorm's weights load into it and back. Batch norm is bnorm's (training/
    evaluation, momentum, unbiased running variance, ``small_batch`` and the NaN guard as in
    :class:`bnorm.BatchNorm2d`). The activation is applied as a module call on batch norm's
    fresh output, not fused into the kernel.

    The activation is any module: a name as timm's ``get_act_layer`` takes it (``"relu"``,
    ``"leaky_relu"``, ``"elu"``, ``"silu"``/``"swish"``, ``"gelu"``, ``"hard_swish"``,
    ``"hard_sigmoid"``, ``"identity"``, ... see :data:`bnorm.modules.act.ACTIVATIONS`), an
    ``nn.Module`` class or factory (built as ``act_layer(inplace=inplace, **act_kwargs)``), or
    a module instance. ``act=`` is the same as ``act_layer=`` (bnorm's older spelling, with
    ``negative_slope`` and ``alpha`` for leaky_relu and elu); ``BatchNormAct2d(C, "elu", True)``
    (activation and ``memory_efficient`` positional) is still understood.

    ``memory_efficient=True`` keeps only the output for the backward (In-Place ABN; see
    :mod:`bnorm.modules.act`): the input of the layer is freed after the forward, and the
    backward recomputes ``x̂`` from ``y``. It needs an invertible activation:
    ``nn.LeakyReLU`` (slope > 0), ``nn.ELU`` (alpha > 0) or ``nn.Identity``, and no
    ``drop_layer``; relu is refused. The weight γ must have no zero while gradients are computed
    (x̂ = (z − β)/γ); a small |γ| costs precision. Double backward is not supported in this
    mode. Gradients equal the plain layer's. ``overwrite_input=True`` (with
    ``memory_efficient=True``) also writes the output into the input's memory, as In-Place ABN
    does, so the forward allocates nothing of the input's size: the input must then not be used
    anywhere else (e.g. by a residual connection); a leaf input that requires grad is refused.

    Args:
        num_features: the number of channels ``C``.
        eps, momentum, affine, track_running_stats, device, dtype: as
            :class:`bnorm.BatchNorm2d`.
        apply_act: ``False`` for no activation (``.act`` is ``nn.Identity``).
        act_layer: the activation (name, class, factory or module). Default ``"relu"``.
        act_kwargs: keyword arguments for ``act_layer``.
        inplace: build the activation in place (timm's default ``True``); it runs on batch
            norm's own output, never on the layer's input.
        drop_layer: a module class applied between batch norm and the activation.
        act: bnorm's older name for ``act_layer`` (keyword only).
        memory_efficient: keep only the output for the backward (keyword only).
        negative_slope, alpha: leaky_relu's slope and elu's alpha for a named activation
            (keyword only; the same as ``act_kwargs``).
        overwrite_input: with ``memory_efficient``, write the output into the input.
        bias, on_nonfinite, small_batch: as :class:`bnorm.BatchNorm2d` (keyword only).
"""

_DEFAULT = object()


def _act_arguments(
    name: str,
    act: Any,
    act_layer: Any,
    act_kwargs: dict[str, Any] | None,
    negative_slope: float | None,
    alpha: float | None,
) -> tuple[Any, dict[str, Any] | None]:
    """Merge bnorm's older ``act``/``negative_slope``/``alpha`` into timm's arguments."""
    if act is not None:
        if act_layer is not _DEFAULT and act_layer is not None:
            raise ValueError(f"{name}: give the activation once, as act_layer= or act=")
        act_layer = act
    if act_layer is _DEFAULT:
        act_layer = "relu"
    if negative_slope is not None or alpha is not None:
        kwargs = dict(act_kwargs or {})
        if negative_slope is not None:
            kwargs.setdefault("negative_slope", float(negative_slope))
        if alpha is not None:
            kwargs.setdefault("alpha", float(alpha))
        layer = get_act_layer(act_layer) if not isinstance(act_layer, nn.Module) else None
        keep = {nn.LeakyReLU: ("negative_slope",), nn.ELU: ("alpha",)}.get(layer, ())
        # a slope or alpha means something only to leaky_relu or elu; others ignore it
        act_kwargs = {
            k: v for k, v in kwargs.items() if k in keep or k not in ("negative_slope", "alpha")
        }
    return act_layer, act_kwargs


class _ActMixin:
    """The activation part shared by every norm-act layer: ``.drop`` then ``.act``."""

    act: nn.Module
    drop: nn.Module

    def _set_act(
        self,
        name: str,
        act_layer: Any,
        act_kwargs: dict[str, Any] | None,
        inplace: bool,
        apply_act: bool,
        drop_layer: Callable[[], nn.Module] | None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(act_layer, str) and act_layer.lower() == "elu":
            a = (act_kwargs or {}).get("alpha", 1.0)
            if not a > 0:
                raise ValueError(f"{name}: elu needs alpha > 0, got {a}")
        try:
            act = create_act(act_layer, act_kwargs, inplace, apply_act)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if device is not None or dtype is not None:
            # an activation with parameters (PReLU) lives where batch norm's do
            act = act.to(device=device, dtype=dtype)
        # timm's order: drop, then act (state_dict and repr list them so)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act

    def _drop_act(self, y: Tensor) -> Tensor:
        return self.act(self.drop(y))


class _BatchNormActBase(_ActMixin, _BatchNormBase):
    # Attributes timm's BatchNormAct2d does not have, with their defaults (bnorm.convert sets
    # them when it turns timm's layer into bnorm's).
    _bnorm_defaults: ClassVar[dict[str, object]] = {
        **_BatchNormBase._bnorm_defaults,
        "memory_efficient": False,
        "overwrite_input": False,
    }

    def __init__(
        self,
        num_features: int,
        eps: float | str = 1e-5,
        momentum: float | bool | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = _DEFAULT,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        act: Any = None,
        memory_efficient: bool = False,
        negative_slope: float | None = None,
        alpha: float | None = None,
        overwrite_input: bool = False,
        **kwargs: Any,
    ) -> None:
        name = f"{type(self).__name__}({num_features})"
        if isinstance(eps, str) or (isinstance(eps, type) and issubclass(eps, nn.Module)):
            # bnorm's older positional form: BatchNormAct2d(C, act, memory_efficient)
            if act is not None:
                raise ValueError(f"{name}: give the activation once")
            act, eps = eps, 1e-5
            if isinstance(momentum, bool):
                memory_efficient, momentum = momentum, 0.1
        if isinstance(momentum, bool):
            raise TypeError(f"{name}: momentum must be a number or None, got {momentum}")
        act_layer, act_kwargs = _act_arguments(
            name, act, act_layer, act_kwargs, negative_slope, alpha
        )
        if overwrite_input and not memory_efficient:
            raise ValueError(
                f"{name}: overwrite_input=True is part of memory_efficient=True; set both"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self._set_act(name, act_layer, act_kwargs, inplace, apply_act, drop_layer, device, dtype)
        self.memory_efficient = bool(memory_efficient)
        self.overwrite_input = bool(overwrite_input)
        if self.memory_efficient:
            self._check_invertible(name)

    def _check_invertible(self, name: str) -> tuple[str, float, float]:
        spec = invertible_spec(self.act)
        if spec is None and type(self.act) in (nn.LeakyReLU, nn.ELU):
            what = "negative_slope" if type(self.act) is nn.LeakyReLU else "alpha"
            raise ValueError(
                f"{name}: memory_efficient=True needs {what} > 0 to invert {self.act}, got "
                f"{getattr(self.act, what)}"
            )
        if spec is None:
            raise ValueError(
                f"{name}: memory_efficient=True needs an invertible activation, and "
                f"{self.act} is not (relu maps every negative input to 0, so the backward "
                f"cannot recover it from the output). Use act='leaky_relu' (e.g. "
                f"negative_slope=0.01, slope > 0), act='elu' (alpha > 0), act='identity', "
                f"or memory_efficient=False."
            )
        if type(self.drop) is not nn.Identity:
            raise ValueError(
                f"{name}: memory_efficient=True inverts the activation right after batch "
                f"norm, so it takes no drop_layer (got {self.drop})"
            )
        return spec

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.act(self.drop(self._op_forward(input)))
        if isinstance(input, torch.fx.Proxy) or torch.jit.is_tracing():
            # symbolic tracing, jit.trace: the operator and the modules, no Python checks
            return self.act(self.drop(self._op_forward(input)))
        if not self.memory_efficient or values_per_channel(input) == 0:
            # batch norm keeps its input, not its output, for the backward: the activation may
            # work in place on this fresh output
            return self._drop_act(self._normalize(input))
        kind, negative_slope, alpha = self._check_invertible(self._layer_name())
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
            act=kind,
            negative_slope=negative_slope,
            alpha=alpha,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if update else None,
            on_nonfinite=self.on_nonfinite,
            layer=self._layer_name(),
            inplace=self.overwrite_input,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if getattr(self, "memory_efficient", False):
            text += ", memory_efficient=True"
        if getattr(self, "overwrite_input", False):
            text += ", overwrite_input=True"
        return text


class BatchNormAct1d(_BatchNormActBase, torch.nn.BatchNorm1d):
    __doc__ = "Batch norm + activation over (N, C) or (N, C, L) input." + _ACT_DOC
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNormAct2d(_BatchNormActBase, torch.nn.BatchNorm2d):
    __doc__ = "Batch norm + activation over (N, C, H, W) input (channels_last kept)." + _ACT_DOC
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class SyncBatchNormAct(_ActMixin, SyncBatchNorm):
    r"""Synchronized batch norm + activation: ``y = act(drop(SyncBN(x)))``, what
    :func:`bnorm.convert_sync_batchnorm` makes of a ``BatchNormAct`` layer (bnorm's or timm's),
    keeping its ``.act`` and ``.drop`` modules.

    Batch norm is :class:`bnorm.SyncBatchNorm` (statistics over every rank of the group in
    training under torch.distributed, local batch norm otherwise); the activation is then a
    module call on its output. ``state_dict`` keys are batch norm's (and the activation's, if it
    has parameters), as in timm's ``SyncBatchNormAct``. ``memory_efficient`` is not available
    here.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device,
            dtype: as :class:`bnorm.SyncBatchNorm`.
        apply_act, act_layer, act_kwargs, inplace, drop_layer: as
            :class:`bnorm.BatchNormAct2d` (keyword only).
        bias, on_nonfinite, timeout: as :class:`bnorm.SyncBatchNorm` (keyword only).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        apply_act: bool = True,
        act_layer: Any = "relu",
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            process_group,
            device,
            dtype,
            **kwargs,
        )
        self._set_act(
            self._layer_name(), act_layer, act_kwargs, inplace, apply_act, drop_layer, device, dtype
        )

    def forward(self, input: Tensor) -> Tensor:
        return self._drop_act(super().forward(input))


_FROZEN_ACT_DOC = r"""

    ``y = act(drop((x − running_mean) / sqrt(running_var + eps) · weight + bias))`` with every
    tensor of batch norm a fixed buffer: :class:`bnorm.FrozenBatchNorm2d` followed by the
    activation, timm's ``FrozenBatchNormAct2d``. Made by :func:`bnorm.freeze` from a
    ``BatchNormAct`` layer (its ``.act`` and ``.drop`` are kept), by :func:`bnorm.convert` from
    timm's ``FrozenBatchNormAct2d``, or directly. ``state_dict`` keys are the frozen batch
    norm's (timm's checkpoints, without ``num_batches_tracked``, load too).

    Args:
        num_features: the number of channels ``C``.
        eps: added to the variance (>= 0). Default 1e-5.
        apply_act, act_layer, act_kwargs, inplace, drop_layer: as
            :class:`bnorm.BatchNormAct2d`.
        device, dtype: of the buffers.
"""


class _FrozenBatchNormActBase(_ActMixin):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        apply_act: bool = True,
        act_layer: Any = "relu",
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, device=device, dtype=dtype)  # type: ignore[call-arg]
        name = f"{type(self).__name__}({num_features})"
        self._set_act(name, act_layer, act_kwargs, inplace, apply_act, drop_layer, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return self._drop_act(super().forward(input))  # type: ignore[misc]


class FrozenBatchNormAct1d(_FrozenBatchNormActBase, FrozenBatchNorm1d):
    __doc__ = "Frozen batch norm + activation over (N, C) or (N, C, L) input." + _FROZEN_ACT_DOC


class FrozenBatchNormAct2d(_FrozenBatchNormActBase, FrozenBatchNorm2d):
    __doc__ = "Frozen batch norm + activation over (N, C, H, W) input." + _FROZEN_ACT_DOC
