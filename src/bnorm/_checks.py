"""Input checks shared by bnorm's functions and layers.

Each check raises before anything is computed or updated, so a layer's state is untouched by a
bad call. Messages name the layer, say what was expected and what came, and keep PyTorch's own
wording where it has one (so code matching torch's messages still matches).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .errors import BatchNormDtypeError, BatchNormShapeError

_LOW_PRECISION = (torch.bfloat16, torch.float16)
NONFINITE_POLICIES = ("warn", "raise")
SMALL_BATCH_POLICIES = ("error", "running")


def shape_text(x: Tensor) -> str:
    return str(tuple(x.shape))


def check_tensor(layer: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")


def check_rank(layer: str, x: Tensor, ranks: tuple[int, ...], layout: str) -> None:
    """``layout`` describes the expected shape, e.g. ``"(N, C, H, W)"``."""
    if x.dim() not in ranks:
        want = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(
            f"{layer}: expected {want} input {layout} "
            f"(got {x.dim()}D input of shape {shape_text(x)})"
        )


def check_channels(layer: str, x: Tensor, num_features: int) -> None:
    if x.dim() < 2 or x.shape[1] != num_features:
        got = x.shape[1] if x.dim() >= 2 else "no channel dimension"
        raise BatchNormShapeError(
            f"{layer}: expected {num_features} channels in dim 1 of the input, got {got} "
            f"(input shape {shape_text(x)})"
        )


def check_dtypes(layer: str, x: Tensor, tensors: Mapping[str, Tensor | None]) -> None:
    """Input must be floating point; each parameter/buffer must share its dtype, or be float32
    when the input is bfloat16/float16 (mixed precision: statistics and affine in float32)."""
    if not x.is_floating_point():
        raise BatchNormDtypeError(f"{layer}: expected a floating-point input, got {x.dtype}")
    for name, t in tensors.items():
        if t is None or t.dtype == x.dtype:
            continue
        if x.dtype in _LOW_PRECISION and t.dtype == torch.float32:
            continue
        raise BatchNormDtypeError(
            f"{layer}: an input of dtype {x.dtype} cannot be served by {name} of dtype {t.dtype}; "
            "parameters and buffers must have the input's dtype (or float32 for a "
            f"bfloat16/float16 input). Convert the input (x.to({t.dtype})) "
            f"or the layer (layer.to({x.dtype}))."
        )


def check_sizes(layer: str, x: Tensor, tensors: Mapping[str, Tensor | None]) -> None:
    """Each per-channel tensor must hold one value per input channel."""
    channels = x.shape[1] if x.dim() >= 2 else 0
    for name, t in tensors.items():
        if t is not None and t.numel() != channels:
            raise BatchNormShapeError(
                f"{layer}: {name} should contain {channels} elements not {t.numel()} "
                f"(one per channel of the input of shape {shape_text(x)})"
            )


def check_per_channel(layer: str, x: Tensor, tensors: Mapping[str, Tensor | None]) -> None:
    """:func:`check_sizes` then :func:`check_dtypes`: what a kernel needs of the per-channel
    tensors it reads (one value per channel, the input's dtype) before it can run."""
    check_sizes(layer, x, tensors)
    check_dtypes(layer, x, tensors)


def check_eps(layer: str, eps: float, *, allow_zero: bool = False) -> None:
    bad = eps < 0 if allow_zero else eps <= 0
    if bad or math.isnan(eps):
        word = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{layer}: eps must be {word}, got {eps}")


def check_batch_size(layer: str, x: Tensor) -> None:
    """Batch statistics need more than one value per channel (PyTorch's rule, and its wording)."""
    values = x.shape[0] * math.prod(x.shape[2:])
    if values == 1:
        raise ValueError(
            f"{layer}: Expected more than 1 value per channel when training, got input size "
            f"{shape_text(x)}. The variance of a single value is undefined: train with 2 or more "
            f"values per channel, or normalize with the running statistics (layer.eval()). "
            f"Remedies in bnorm: small_batch='running' on bnorm.BatchNorm1d/2d/3d (running "
            f"statistics for such batches, no update), bnorm.freeze(model) "
            f"(FrozenBatchNorm), or a layer without batch statistics (torch.nn.GroupNorm, "
            f"torch.nn.LayerNorm)."
        )


def check_nonfinite_policy(layer: str, policy: str) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"{layer}: on_nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}"
        )
    return policy


def check_small_batch_policy(layer: str, policy: str) -> str:
    if policy not in SMALL_BATCH_POLICIES:
        raise ValueError(
            f"{layer}: small_batch must be one of {SMALL_BATCH_POLICIES}, got {policy!r}"
        )
    return policy
