"""Input checks shared by bnorm's functions and layers.

Each check raises before anything is computed or updated, so a layer's state is untouched by a
bad call. Messages name the layer, say what was expected and what came, and keep PyTorch's own
wording where it has one (so code matching torch's messages still matches).
"""

from __future__ import annotations

import math
import numbers
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


def check_per_channel(
    layer: str, x: Tensor, tensors: Mapping[str, Tensor | None], *, empty_ok: bool = False
) -> None:
    """What a kernel needs of the input and the per-channel tensors it reads before it can run:
    one device (:func:`check_device`), one value per
    channel (:func:`check_sizes`) and the input's dtype (:func:`check_dtypes`). With
    ``empty_ok``, an empty input skips the dtype check: there is nothing to compute, and torch
    returns an empty result for it whatever the dtypes."""
    check_device(layer, x, tensors)
    check_sizes(layer, x, tensors)
    if not (empty_ok and x.numel() == 0):
        check_dtypes(layer, x, tensors)


def check_eps(layer: str, eps: float, *, allow_zero: bool = False, training: bool = False) -> None:
    """``eps`` must be positive (non-negative with ``allow_zero``), in torch's wording:
    "batch_norm eps must be positive during training, but got -1" (``training``) and
    "batch_norm eps must be non-negative, but got -1"."""
    bad = eps < 0 if allow_zero else eps <= 0
    if bad or math.isnan(eps):
        word = "non-negative" if allow_zero else "positive"
        when = " during training" if training and not allow_zero else ""
        raise ValueError(f"{layer}: eps must be {word}{when}, but got {eps}")


def check_momentum(layer: str, momentum: object) -> None:
    """``momentum`` is the update rate of the running statistics: a finite number in [0, 1], or
    ``None`` (cumulative average). Anything else would poison the running statistics on the
    first update (NaN, Inf, or an extrapolation away from the batch statistics); torch does not
    check it and has no wording of its own."""
    if momentum is None:
        return
    if not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"{layer}: momentum must be a number in [0, 1] or None, got {type(momentum).__name__}"
        )
    if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(
            f"{layer}: momentum must be a finite number in [0, 1] (the update rate of the "
            f"running statistics) or None (cumulative average), got {momentum}"
        )


def _is_fake(t: Tensor) -> bool:
    if torch.compiler.is_compiling():  # everything is fake there, and dynamo skips is_fake
        return False
    # FakeTensor lives in a private module; import lazily so a torch without it still works.
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - torch builds without fake tensors
        return False
    return bool(is_fake(t))


def check_device(layer: str, x: Tensor, tensors: Mapping[str, Tensor | None]) -> None:
    """Each per-channel tensor must be on the input's device (torch: "Expected all tensors to be
    on the same device"), and a FakeTensor input needs fake parameters and buffers (and
    the other way round): mixing them fails inside the kernels, after state has changed."""
    x_fake = _is_fake(x)
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(
                f"{layer}: Expected all tensors to be on the same device: the input is on "
                f"{x.device} and {name} on {t.device}. Move the input (x.to({str(t.device)!r})) "
                f"or the layer (layer.to({str(x.device)!r}))."
            )
        if _is_fake(t) != x_fake:
            what = ("a FakeTensor", "a real tensor")
            raise RuntimeError(
                f"{layer}: the input is {what[not x_fake]} and {name} is {what[x_fake]}; "
                "create the layer under the same FakeTensorMode as the input (or give it real "
                "inputs)"
            )


_PLAIN_DTYPES = (torch.float32, torch.float64)
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def plainly_valid(
    x: object,
    ranks: tuple[int, ...],
    num_features: int,
    tensors: tuple[Tensor | None, ...],
    eps: float,
    momentum: object,
    on_nonfinite: str,
    use_batch_stats: bool,
) -> bool:
    """True when a layer call is certainly valid: a plain float32/float64 tensor of an accepted
    rank and channel count, per-channel tensors of C values of its dtype on its device, a
    positive eps, a momentum in [0, 1] or None and more than one value per channel for batch
    statistics. False means "not sure": :func:`check_call` then decides, and words the error.

    Why: a layer's checks run at every call, and on small inputs the full checks would cost as
    much as the batch norm itself.
    """
    if type(x) is not Tensor or x.dim() not in ranks or not x.is_cpu:
        return False
    if x.shape[1] != num_features or x.dtype not in _PLAIN_DTYPES:
        return False
    dtype = x.dtype
    for t in tensors:
        if t is not None and (
            type(t) not in _PLAIN_TYPES
            or t.dtype != dtype
            or not t.is_cpu
            or t.numel() != num_features
        ):
            return False
    if type(eps) not in (float, int) or not eps > 0 or on_nonfinite not in NONFINITE_POLICIES:
        return False
    if momentum is not None and (type(momentum) not in (float, int) or not 0 <= momentum <= 1):
        return False
    return not use_batch_stats or x.numel() > num_features


def check_call(
    layer: str,
    x: object,
    *,
    ranks: tuple[int, ...] | None,
    layout: str,
    num_features: int,
    tensors: Mapping[str, Tensor | None],
    eps: float,
    momentum: object,
    on_nonfinite: str,
    use_batch_stats: bool,
) -> None:
    """Every check of one layer call, in torch's order, all before any state changes.

    torch's order: the input's rank, then (batch statistics) more than one value per channel,
    then eps, then what the kernel checks (sizes, dtypes). An empty batch is not checked for
    dtypes: there is nothing to compute, and torch returns an empty result for it.
    ``ranks=None`` accepts any rank >= 2 (``(N, C, *)``).
    """
    check_tensor(layer, x)
    assert isinstance(x, Tensor)
    if ranks is None:
        if x.dim() < 2:
            raise ValueError(
                f"{layer}: expected at least 2D input (N, C, *) "
                f"(got {x.dim()}D input of shape {shape_text(x)})"
            )
    else:
        check_rank(layer, x, ranks, layout)
    if use_batch_stats:
        check_batch_size(layer, x)
    check_eps(layer, eps, training=use_batch_stats)
    check_momentum(layer, momentum)
    check_nonfinite_policy(layer, on_nonfinite)
    check_channels(layer, x, num_features)
    check_per_channel(layer, x, tensors, empty_ok=True)


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
