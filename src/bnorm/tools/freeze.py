"""Freeze a model's batch-norm layers (fixed statistics and affine), and unfreeze them."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from ..modules import batchnorm as _bn
from ..modules.act import FrozenBatchNormAct1d, FrozenBatchNormAct2d
from ..modules.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenBatchNormBase,
)
from .convert import ConversionSummary, is_batch_norm_like, rewrite

__all__ = ["freeze", "unfreeze"]

_BY_RANK: tuple[tuple[type[nn.Module], type[_FrozenBatchNormBase], type[nn.Module]], ...] = (
    (nn.BatchNorm1d, FrozenBatchNorm1d, _bn.BatchNorm1d),
    (nn.BatchNorm2d, FrozenBatchNorm2d, _bn.BatchNorm2d),
    (nn.BatchNorm3d, FrozenBatchNorm3d, _bn.BatchNorm3d),
)
# batch norm + activation (bnorm's, timm's): frozen with the activation kept
_ACT_BY_RANK: tuple[tuple[type[nn.Module], type[_FrozenBatchNormBase], str], ...] = (
    (nn.BatchNorm1d, FrozenBatchNormAct1d, "BatchNormAct1d"),
    (nn.BatchNorm2d, FrozenBatchNormAct2d, "BatchNormAct2d"),
)


def freeze(
    model: nn.Module, *, return_summary: bool = False
) -> nn.Module | tuple[nn.Module, ConversionSummary]:
    """Replace every batch-norm layer in ``model`` by a frozen one that computes exactly what the
    layer computed in evaluation mode, in training mode too.

    Frozen: ``torch.nn.BatchNorm1d/2d/3d`` and their subclasses with running statistics —
    bnorm's ``BatchNorm*``, ``BatchRenorm*`` and ``GhostBatchNorm*`` (whose evaluation is batch
    norm's); batch norm + activation layers (bnorm's ``BatchNormAct1d/2d``, timm's
    ``BatchNormAct2d``) become :class:`bnorm.FrozenBatchNormAct1d`/``2d`` holding the same
    ``.act`` and ``.drop`` modules. Left alone, listed in a
    :class:`bnorm.LayersLeftWarning`: layers without running statistics
    (``track_running_stats=False``: their evaluation uses batch statistics, which cannot be
    frozen), ``SyncBatchNorm``, uninitialized lazy layers and other batch-norm-like layers.

    The frozen layer holds the same tensors (detached from autograd): ``weight`` and ``bias``
    become buffers (ones and zeros for ``affine=False``), so they are no longer parameters
    and get no gradient; the running statistics are no longer updated. The model is changed in
    place and returned (a batch-norm ``model`` itself is returned frozen); with
    ``return_summary=True``, ``(model, summary)`` (a
    :class:`bnorm.ConversionSummary`, also logged on the ``"bnorm"`` logger).
    :func:`unfreeze` reverses this.
    """
    _check(model, "freeze")
    new, summary = rewrite(model, _frozen, "freeze")
    return (new, summary) if return_summary else new


def unfreeze(
    model: nn.Module, *, return_summary: bool = False
) -> nn.Module | tuple[nn.Module, ConversionSummary]:
    """Reverse :func:`freeze`: every frozen layer becomes the layer it was frozen from (its class
    and settings, e.g. momentum, ``affine``, ``r_max``, hooks), holding the frozen layer's
    current tensors, in the frozen layer's train/eval mode. ``weight`` and ``bias`` become
    parameters again — new ``Parameter`` objects on the same storage, so build the optimizer
    after unfreezing. A frozen layer made directly becomes ``bnorm.BatchNormXd`` (affine).
    A layer frozen from ``affine=False`` comes back without weight and bias. A frozen
    batch norm + activation comes back with its current ``.act`` and ``.drop``. Frozen layers of
    other libraries (torchvision's, timm's) are left, with a warning: :func:`bnorm.convert`
    turns them into bnorm's first. ``return_summary`` as in :func:`freeze`.
    """
    _check(model, "unfreeze")
    new, summary = rewrite(model, _unfrozen, "unfreeze")
    return (new, summary) if return_summary else new


def _check(model: object, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: expected a torch.nn.Module, got {type(model).__name__}")


def _frozen(m: nn.Module) -> nn.Module | str | None:
    if "Frozen" in type(m).__name__ or not is_batch_norm_like(m):
        return None  # frozen already (bnorm's, torchvision's, timm's), or not batch norm
    act = m._modules.get("act")
    if isinstance(act, nn.Module):
        target = next((f for t, f, _ in _ACT_BY_RANK if isinstance(m, t)), None)
    else:
        target = next((f for t, f, _ in _BY_RANK if isinstance(m, t)), None)
    if target is None:
        if isinstance(m, nn.SyncBatchNorm | nn.modules.batchnorm._BatchNorm):
            return "no frozen layer of its kind (SyncBatchNorm: freeze its local layer instead)"
        return "no frozen layer of its kind"
    if (
        m.running_mean is None
        or m.running_var is None
        or isinstance(m.running_mean, nn.parameter.UninitializedBuffer)
    ):
        return "no running statistics (track_running_stats=False or lazy): nothing to freeze"
    rm = m.running_mean.detach()
    frozen = target(m.num_features, m.eps, device=rm.device, dtype=rm.dtype)
    if isinstance(act, nn.Module):
        frozen.drop = m._modules.get("drop") or nn.Identity()
        frozen.act = act
    frozen._buffers.update(
        weight=rm.new_ones(rm.shape) if m.weight is None else m.weight.detach(),
        bias=rm.new_zeros(rm.shape) if m.bias is None else m.bias.detach(),
        running_mean=rm,
        running_var=m.running_var.detach(),
    )
    if m.num_batches_tracked is not None:
        frozen._buffers["num_batches_tracked"] = m.num_batches_tracked
    frozen.train(m.training)
    frozen._unfrozen = {
        "cls": type(m),
        # everything but the tensors, which come back from the frozen layer
        "dict": {
            k: (v.copy() if isinstance(v, dict | OrderedDict) else v)
            for k, v in m.__dict__.items()
            if k not in ("_parameters", "_buffers")
        },
        "parameters": {
            name: None if p is None else p.requires_grad for name, p in m._parameters.items()
        },
        "buffers": list(m._buffers),
    }
    return frozen


def _unfrozen(m: nn.Module) -> nn.Module | str | None:
    if not isinstance(m, _FrozenBatchNormBase):
        if is_batch_norm_like(m) and "Frozen" in type(m).__name__:
            return "not bnorm's frozen layer (bnorm.convert makes it bnorm's first)"
        return None
    saved: dict[str, Any] | None = m._unfrozen
    if saved is None:  # made directly: a bnorm batch norm with the same tensors
        target = _unfrozen_class(type(m))
        saved = {
            "cls": target,
            "dict": _fresh_state(target, m),
            "parameters": {"weight": True, "bias": True},
            "buffers": ["running_mean", "running_var", "num_batches_tracked"],
        }
    cls = saved["cls"]
    state = {
        k: (v.copy() if isinstance(v, dict | OrderedDict) else v) for k, v in saved["dict"].items()
    }
    state["_parameters"] = OrderedDict(
        (name, None if grad is None else nn.Parameter(m._buffers[name], requires_grad=grad))
        for name, grad in saved["parameters"].items()
    )
    state["_buffers"] = OrderedDict((name, m._buffers.get(name)) for name in saved["buffers"])
    if m._modules:  # the activation and drop of a frozen norm-act layer, as they are now
        state["_modules"] = OrderedDict(m._modules)
    new = cls.__new__(cls)
    object.__setattr__(new, "__dict__", state)
    new.train(m.training)
    return new


def _unfrozen_class(frozen: type[nn.Module]) -> type[nn.Module]:
    from ..modules import act as _act

    for _, f, name in _ACT_BY_RANK:
        if f is frozen:
            return getattr(_act, name)
    return next(b for _, f, b in _BY_RANK if f is frozen)


def _fresh_state(target: type[nn.Module], m: _FrozenBatchNormBase) -> dict[str, Any]:
    """The non-tensor state of a fresh ``target`` layer with ``m``'s size and eps."""
    fresh = target(m.num_features, m.eps, device=m.running_mean.device, dtype=m.running_mean.dtype)
    return {k: v for k, v in fresh.__dict__.items() if k not in ("_parameters", "_buffers")}
