r"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

Each class subclasses torch's own, so ``isinstance(layer, torch.nn.BatchNorm2d)`` holds and every
tool that looks for batch norm (weight-decay filters, fusers, freezers) still finds it;
parameters, buffers, ``state_dict`` keys, ``repr`` and checkpoint versioning are torch's
unchanged. What bnorm replaces is the computation and the checks: see :mod:`bnorm.functional`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, functional
from ..functional import batch_norm_unchecked, plain_eval_call

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_COMMON_DOC = r"""

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Mean and variance are taken per channel ``C`` over every other dimension. In training the
    batch's own statistics normalize (the variance biased, ``correction=0``); in evaluation the
    running estimates do. With ``track_running_stats=False`` there are no running estimates and
    batch statistics are used in both modes.

    Running estimates follow PyTorch's convention, not Keras': ``momentum`` is the update rate,
    ``running = (1 - momentum) * running + momentum * batch``, and ``momentum=None`` is the
    cumulative average (``1/t`` for the t-th batch, counted by ``num_batches_tracked``). The
    stored variance is unbiased (``n/(n-1)``). Keras' ``momentum=0.99`` is PyTorch's 0.01
    (:func:`bnorm.reference.keras_momentum`).

    Beyond torch:

    - statistics keep their precision for data far from zero (mean up to 1e5 standard
      deviations in fp32: output within 1e-6 instead of torch's 1e-2);
    - a training batch holding NaN or Inf leaves ``running_mean``, ``running_var`` and
      ``num_batches_tracked`` untouched and warns (:class:`~bnorm.errors.NonFiniteBatchWarning`);
      ``on_nonfinite="raise"`` raises :class:`~bnorm.errors.NonFiniteBatchError` instead;
    - a bad input raises an error naming the layer, what was expected and what came, before
      any state changes.

    Args:
        num_features: the number of channels ``C``.
        eps: added to the variance; must be positive. Default 1e-5.
        momentum: update rate of the running statistics, or ``None`` for the cumulative
            average. Default 0.1.
        affine: learn a per-channel scale ``weight`` (γ, init 1) and shift ``bias`` (β, init 0).
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
        device, dtype: where and in what dtype to create parameters and buffers. A
            bfloat16/float16 input may be served by float32 parameters (mixed precision).
        bias: with ``affine``, whether to learn ``bias`` (keyword only).
        on_nonfinite: ``"warn"`` or ``"raise"`` for a training batch holding NaN/Inf
            (keyword only; not part of the state_dict).
        small_batch: what a training batch with one value per channel does (keyword only; not
            part of the state_dict). ``"error"`` (default) raises torch's error, naming the
            remedies; ``"running"`` normalizes it with the running statistics and leaves them
            (and ``num_batches_tracked``) unchanged, e.g. for online learning with batches of
            one. Without running statistics (``track_running_stats=False``) it always raises.
"""


class _BatchNormBase:
    """What bnorm's batch-norm layers add to torch's: checks, computation, the NaN guard.

    Placed before torch's class in the MRO; torch's ``_NormBase`` keeps owning parameters,
    buffers, ``reset_parameters``, ``extra_repr`` and ``_load_from_state_dict``.
    """

    _ranks: tuple[int, ...] = ()
    _layout: str = ""

    # Attributes torch's class does not have, with their defaults; bnorm.convert() sets them
    # when it turns a torch layer into a bnorm one.
    _bnorm_defaults: ClassVar[dict[str, object]] = {"on_nonfinite": "warn", "small_batch": "error"}

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        on_nonfinite: str = "warn",
        small_batch: str = "error",
    ) -> None:
        # torch added the `bias` argument only recently; dropping the parameter here gives the
        # same module (and state_dict) on every torch version bnorm supports.
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device, dtype
        )
        if affine and not bias:
            self.register_parameter("bias", None)  # type: ignore[attr-defined]
        _checks.check_momentum(self._layer_name(), momentum)
        self.on_nonfinite = _checks.check_nonfinite_policy(self._layer_name(), on_nonfinite)
        self.small_batch = _checks.check_small_batch_policy(self._layer_name(), small_batch)

    def _layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        _checks.check_rank(self._layer_name(), input, self._ranks, self._layout)

    def _check_input(self, input: Tensor, use_batch_stats: bool) -> None:
        """Everything that can be wrong with a call, checked before any state changes.
        (Not under ``torch.jit.trace``, where the checks' comparisons would be traced.)"""
        if torch.jit.is_tracing():
            return
        params, buffers = self._parameters, self._buffers
        if _checks.plainly_valid(
            input,
            self._ranks,
            self.num_features,
            (
                params.get("weight"),
                params.get("bias"),
                buffers.get("running_mean"),
                buffers.get("running_var"),
            ),
            self.eps,
            self.momentum,
            self.on_nonfinite,
            use_batch_stats,
        ):
            return  # the common case, recognized in a few comparisons
        _checks.check_call(
            self._layer_name(),
            input,
            ranks=self._ranks or None,
            layout=self._layout,
            num_features=self.num_features,
            tensors={
                "weight": self.weight,
                "bias": self.bias,
                "running_mean": self.running_mean,
                "running_var": self.running_var,
            },
            eps=self.eps,
            momentum=self.momentum,
            on_nonfinite=self.on_nonfinite,
            use_batch_stats=use_batch_stats,
        )

    def _uses_running_stats_for(self, input: Tensor) -> bool:
        """The batch-of-one policy: with ``small_batch="running"``, a training batch holding one
        value per channel is normalized with the running statistics, which it does not update
        (its variance is undefined, so there is nothing to learn from it)."""
        return (
            self.training
            and getattr(self, "small_batch", "error") == "running"  # old pickles lack it
            and self.running_mean is not None
            and isinstance(input, Tensor)
            and input.dim() >= 2
            and input.numel() == input.shape[1]
        )

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._one_node(input)
        if not self.training and plain_eval_call is not None and not functional.composite_wanted():
            # evaluation of a plain CPU tensor: the checks and the operator in one C++ call
            # (bnorm._C.eval_call); None when the call needs the path below
            y = plain_eval_call(input, self.__dict__, self._ranks)
            if y is not None:
                return y
        if isinstance(input, torch.fx.Proxy) or torch.jit.is_tracing():
            return self._one_node(input)  # symbolic tracing, jit.trace: one node, no checks
        return self._normalize(input)

    def _one_node(self, input: Tensor) -> Tensor:
        """The layer as one recorded operator (TorchScript, jit.trace, FX): batch norm's
        :meth:`_op_forward`; the remedies that train differently override this (TorchScript
        has no super(), so each override calls the inherited ``_op_forward`` by name)."""
        return self._op_forward(input)

    def _normalize(self, input: Tensor) -> Tensor:
        """The eager call: the checks, then bnorm's batch norm (:mod:`bnorm.functional`)."""
        fallback = self._uses_running_stats_for(input)
        use_batch_stats = (self.training or self.running_mean is None) and not fallback
        self._check_input(input, use_batch_stats)
        update = self.training and self.track_running_stats and not fallback
        return batch_norm_unchecked(
            input,
            self.running_mean if update or not use_batch_stats else None,
            self.running_var if update or not use_batch_stats else None,
            self.weight,
            self.bias,
            use_batch_stats=use_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if update else None,
            on_nonfinite=self.on_nonfinite,
            layer=self._layer_name,  # named only if a message needs it
        )

    def _op_forward(self, input: Tensor) -> Tensor:
        """The layer as the one operator ``torch.ops.bnorm.batch_norm`` (TorchScript, FX):
        torch's rule for which statistics normalize and which are updated."""
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        return torch.ops.bnorm.batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean if update or not use_batch_stats else None,
            self.running_var if update or not use_batch_stats else None,
            self.num_batches_tracked if update else None,
            use_batch_stats,
            self.momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        if self.on_nonfinite != "warn":
            text += f", on_nonfinite={self.on_nonfinite!r}"
        if getattr(self, "small_batch", "error") != "error":
            text += f", small_batch={self.small_batch!r}"
        return text


class BatchNorm1d(_BatchNormBase, torch.nn.BatchNorm1d):
    __doc__ = (
        r"""Batch normalization over a 2D input (N, C) or a 3D input (N, C, L); a drop-in for
    :class:`torch.nn.BatchNorm1d`.

    Shape: input (N, C) or (N, C, L); output of the same shape."""
        + _COMMON_DOC
    )
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNormBase, torch.nn.BatchNorm2d):
    __doc__ = (
        r"""Batch normalization over a 4D input (N, C, H, W); a drop-in for
    :class:`torch.nn.BatchNorm2d`.

    Shape: input (N, C, H, W); output of the same shape and memory format (channels_last
    stays channels_last)."""
        + _COMMON_DOC
    )
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(_BatchNormBase, torch.nn.BatchNorm3d):
    __doc__ = (
        r"""Batch normalization over a 5D input (N, C, D, H, W); a drop-in for
    :class:`torch.nn.BatchNorm3d`.

    Shape: input (N, C, D, H, W); output of the same shape and memory format
    (channels_last_3d stays channels_last_3d)."""
        + _COMMON_DOC
    )
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
