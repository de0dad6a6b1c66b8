"""Swap torch's batch-norm layers for bnorm's, and back, with the state unchanged."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..modules import batchnorm as _bn

__all__ = ["convert"]

_TO_BNORM: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: _bn.BatchNorm1d,
    nn.BatchNorm2d: _bn.BatchNorm2d,
    nn.BatchNorm3d: _bn.BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {b: t for t, b in _TO_BNORM.items()}


def convert(model: nn.Module, to: str = "bnorm") -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` by bnorm's (``to="bnorm"``), or
    every bnorm ``BatchNorm1d/2d/3d`` by torch's (``to="torch"``).

    The new layers take over the old ones' parameters and buffers (the same tensor objects, so
    an optimizer built before still holds them), their train/eval mode and their hooks; the
    conversion is exact both ways. Only these exact classes are swapped: subclasses and other
    normalization layers are left alone. The model is changed in place and returned (if
    ``model`` is itself a batch-norm layer, the new layer is returned).
    """
    if to == "bnorm":
        mapping = _TO_BNORM
    elif to == "torch":
        mapping = _TO_TORCH
    else:
        raise ValueError(f"convert: `to` must be 'bnorm' or 'torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    return _swap(model, mapping)


def _swap(module: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _swap(child, mapping)
    target = mapping.get(type(module))
    return module if target is None else _retyped(module, target)


def _retyped(module: nn.Module, target: type[nn.Module]) -> nn.Module:
    """A ``target`` instance holding ``module``'s state: same tensors, fresh containers."""
    new = target.__new__(target)
    state = {
        k: (v.copy() if isinstance(v, dict | OrderedDict) else v)
        for k, v in module.__dict__.items()
    }
    bnorm_only = _bn._BatchNormBase._bnorm_defaults
    if issubclass(target, _bn._BatchNormBase):
        for key, default in bnorm_only.items():
            state.setdefault(key, default)
    else:
        for key in bnorm_only:
            state.pop(key, None)
    # Modules hold their state in __dict__ only, so this is the whole module.
    object.__setattr__(new, "__dict__", state)
    return new
