r"""Frozen batch norm: fixed statistics and affine, the same in training and evaluation.

.. math::

    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

with ``running_mean`` μ, ``running_var`` σ², ``weight`` γ and ``bias`` β all fixed buffers. This
is batch norm's evaluation mode, kept under ``model.train()``: the usual remedy when fine-tuning
with batches too small for batch statistics (detection, segmentation), and one way to remove
the train/inference discrepancy. The input still receives its gradient,
``dx = γ dy / sqrt(σ² + ε)``; nothing in the layer is learned or updated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import _checks
from ..functional import batch_norm_unchecked

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNormBase(nn.Module):
    _ranks: tuple[int, ...] = ()
    _layout: str = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _checks.check_eps(f"{type(self).__name__}({num_features})", eps, allow_zero=True)
        self.num_features = num_features
        self.eps = eps
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        # How bnorm.unfreeze rebuilds the layer this one was frozen from (set by freeze).
        self._unfrozen: dict[str, Any] | None = None

    def _layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._op_forward(input)
        if isinstance(input, torch.fx.Proxy) or torch.jit.is_tracing():
            return self._op_forward(input)  # symbolic tracing, jit.trace: one node, no checks
        name = self._layer_name()
        _checks.check_tensor(name, input)
        _checks.check_rank(name, input, self._ranks, self._layout)
        _checks.check_channels(name, input, self.num_features)
        _checks.check_per_channel(
            name,
            input,
            {
                "weight": self.weight,
                "bias": self.bias,
                "running_mean": self.running_mean,
                "running_var": self.running_var,
            },
        )
        # Exactly bnorm's evaluation-mode batch norm, whatever self.training says.
        return batch_norm_unchecked(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats=False,
            momentum=0.0,
            eps=self.eps,
            layer=name,
        )

    def _op_forward(self, input: Tensor) -> Tensor:
        """The layer as the one operator ``torch.ops.bnorm.batch_norm_eval`` (TorchScript, FX)."""
        return torch.ops.bnorm.batch_norm_eval(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Checkpoints of other frozen batch norms (torchvision's) have no num_batches_tracked;
        # it means nothing here, so its absence is fine.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict = {**state_dict, key: self.num_batches_tracked}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


_FROZEN_DOC = r"""

    ``y = (x − running_mean) / sqrt(running_var + eps) · weight + bias`` with every tensor a
    fixed buffer (no parameters): batch norm's evaluation mode, in training mode too. Made by
    :func:`bnorm.freeze` (which copies a trained layer's state and computes exactly what its
    evaluation mode computed) or directly; ``state_dict`` keys are ``BatchNormXd``'s (weight,
    bias, running_mean, running_var, num_batches_tracked), so batch-norm checkpoints load into
    it and back; a checkpoint without ``num_batches_tracked`` loads too.

    Args:
        num_features: the number of channels ``C``.
        eps: added to the variance (>= 0). Default 1e-5.
        device, dtype: of the buffers (keyword only).
"""


class FrozenBatchNorm1d(_FrozenBatchNormBase):
    __doc__ = "Frozen batch norm over (N, C) or (N, C, L) input." + _FROZEN_DOC
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class FrozenBatchNorm2d(_FrozenBatchNormBase):
    __doc__ = "Frozen batch norm over (N, C, H, W) input." + _FROZEN_DOC
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class FrozenBatchNorm3d(_FrozenBatchNormBase):
    __doc__ = "Frozen batch norm over (N, C, D, H, W) input." + _FROZEN_DOC
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
