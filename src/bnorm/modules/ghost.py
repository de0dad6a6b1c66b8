r"""Ghost Batch Normalization (Hoffer, Hubara, Soudry 2017): batch norm over small virtual batches.

In training, the batch is cut along dim 0 into consecutive chunks of ``virtual_batch_size``
samples (the last may be smaller), and each chunk :math:`k` is normalized with its own statistics,

.. math::

    y = \gamma\,\frac{x - \mu_k}{\sqrt{\sigma^2_k + \epsilon}} + \beta
    \quad\text{for } x \text{ in chunk } k,

so a large batch keeps the noise (and the generalization) of small ones. The running statistics
move once per forward, towards the mean of the chunks' means and the mean of the chunks'
unbiased variances. With ``virtual_batch_size`` >= the batch, it is batch norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._remedies_common import as_supported_layout, values_per_channel
from ..functional import batch_norm_unchecked, train_forward, update_running_stats
from .batchnorm import _BatchNormBase

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "ghost_batch_norm"]


def check_virtual_batches(layer: str, x: Tensor, virtual_batch_size: int) -> None:
    """Every virtual batch needs more than one value per channel (its variance is undefined)."""
    n = x.shape[0]
    if n == 0:
        return
    last = n - (n - 1) // virtual_batch_size * virtual_batch_size
    per_sample = values_per_channel(x) // n
    if min(last, virtual_batch_size) * per_sample == 1:
        raise ValueError(
            f"{layer}: Expected more than 1 value per channel in every virtual batch when "
            f"training; a batch of {n} cut into virtual batches of {virtual_batch_size} leaves "
            f"one of a single value per channel (input shape {tuple(x.shape)}). Use a batch "
            f"size that is not 1 more than a multiple of {virtual_batch_size}, or another "
            f"virtual_batch_size."
        )


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    virtual_batch_size: int,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
    on_nonfinite: str = "warn",
    layer: str = "ghost_batch_norm",
) -> Tensor:
    r"""Training-mode ghost batch norm of a checked input ``x`` (N, C, \*) (see the module
    docstring). ``running_mean``/``running_var`` (or ``None``) are updated in place once."""
    if x.shape[0] <= virtual_batch_size or values_per_channel(x) == 0:
        # One virtual batch: exactly batch norm (the mean of one chunk's statistics is its own).
        return batch_norm_unchecked(
            x, running_mean, running_var, weight, bias, use_batch_stats=True,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
            on_nonfinite=on_nonfinite, layer=layer,
        )  # fmt: skip
    x = as_supported_layout(x)
    outputs, means, unbiased = [], [], []
    for chunk in x.split(virtual_batch_size, dim=0):
        # one operator call per chunk (with its own autograd node): γ and β collect their
        # gradients from all chunks
        y, mean, var = train_forward(chunk, weight, bias, eps)
        count = values_per_channel(chunk)
        means.append(mean)
        unbiased.append(var * (count / (count - 1)))
        outputs.append(y)
    if running_mean is not None and running_var is not None:
        # The running variance moves towards the mean of the chunks' unbiased variances. The
        # update unbiases a biased variance over `n` values by n/(n-1): hand it that variance
        # times (n-1)/n, for any n > 1 (the whole batch's count here).
        n = values_per_channel(x)
        update_running_stats(
            running_mean, running_var, torch.stack(means).mean(0),
            torch.stack(unbiased).mean(0) * ((n - 1) / n), n, momentum, num_batches_tracked,
            on_nonfinite, layer,
        )  # fmt: skip
    return torch.cat(outputs, dim=0)


# One operator for the tools that record a layer as one node (TorchScript, jit.trace, FX):
# its kernel is ghost_batch_norm above, as aten and bnorm operators (CompositeImplicitAutograd).
_LIBRARY = torch.library.Library("bnorm", "FRAGMENT")
_LIBRARY.define(
    "ghost_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, SymInt virtual_batch_size, "
    "float? momentum, float eps) -> Tensor"
)


def _ghost_batch_norm_kernel(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    virtual_batch_size: int,
    momentum: float | None,
    eps: float,
) -> Tensor:
    return ghost_batch_norm(
        input, running_mean, running_var, weight, bias, virtual_batch_size=virtual_batch_size,
        momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
    )  # fmt: skip


_LIBRARY.impl("ghost_batch_norm", _ghost_batch_norm_kernel, "CompositeImplicitAutograd")


_GHOST_DOC = r"""

    Training: consecutive chunks of ``virtual_batch_size`` samples (dim 0; the last may be
    smaller) are each normalized with their own mean and biased variance,
    ``y = γ·(x − μ_k)/sqrt(σ²_k + eps) + β``. The running statistics move once per forward
    (``momentum`` is PyTorch's update rate, ``None`` the cumulative average) towards the mean
    of the chunks' means and the mean of the chunks' unbiased variances. With
    ``virtual_batch_size`` >= N it is batch norm exactly. Evaluation is batch norm's (running
    statistics); with ``track_running_stats=False`` the chunks' statistics are used in both
    modes. ``state_dict`` keys are ``BatchNormXd``'s (``virtual_batch_size`` is a constructor
    argument, not state) and ``isinstance(layer, torch.nn.BatchNormXd)`` holds.

    A training batch that would leave a virtual batch with a single value per channel (e.g.
    N = 9 with ``virtual_batch_size=4`` on (N, C) input) raises, before any state changes.

    Args:
        num_features: the number of channels ``C``.
        virtual_batch_size: samples per virtual batch, >= 1.
        eps, momentum, affine, track_running_stats, device, dtype: as :class:`bnorm.BatchNorm2d`.
        bias, on_nonfinite, small_batch: as :class:`bnorm.BatchNorm2d` (keyword only).
"""


class _GhostBatchNormBase(_BatchNormBase):
    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
            raise TypeError(
                f"{type(self).__name__}({num_features}): virtual_batch_size must be an int, "
                f"got {type(virtual_batch_size).__name__}"
            )
        if virtual_batch_size < 1:
            raise ValueError(
                f"{type(self).__name__}({num_features}): virtual_batch_size must be >= 1, "
                f"got {virtual_batch_size}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.virtual_batch_size = virtual_batch_size

    def _normalize(self, input: Tensor) -> Tensor:
        """The eager call (batch norm's :meth:`forward` routes to it): ghost batches in training,
        batch norm where the running statistics normalize."""
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or self._uses_running_stats_for(input):
            return super()._normalize(input)
        self._check_input(input, True)
        check_virtual_batches(self._layer_name(), input, self.virtual_batch_size)
        update = self.training and self.track_running_stats
        return ghost_batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            virtual_batch_size=self.virtual_batch_size,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if update else None,
            on_nonfinite=self.on_nonfinite,
            layer=self._layer_name(),
        )

    def _one_node(self, input: Tensor) -> Tensor:
        """The layer as one operator (TorchScript, jit.trace, FX): batch norm's (``_op_forward``)
        where the running statistics normalize, else ``torch.ops.bnorm.ghost_batch_norm``."""
        if not (self.training or self.running_mean is None):
            return self._op_forward(input)  # batch norm's evaluation
        update = self.training and self.track_running_stats
        return torch.ops.bnorm.ghost_batch_norm(
            input, self.weight, self.bias,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.num_batches_tracked if update else None,
            self.virtual_batch_size, self.momentum, self.eps,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNormBase, torch.nn.BatchNorm1d):
    __doc__ = "Ghost batch norm over (N, C) or (N, C, L) input." + _GHOST_DOC
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class GhostBatchNorm2d(_GhostBatchNormBase, torch.nn.BatchNorm2d):
    __doc__ = "Ghost batch norm over (N, C, H, W) input (channels_last kept)." + _GHOST_DOC
    _ranks = (4,)
    _layout = "(N, C, H, W)"
