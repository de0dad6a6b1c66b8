"""Swap torch's (and timm's) batch-norm layers for bnorm's, and back, with the state unchanged;
and the report every model-rewriting tool of bnorm gives (:class:`ConversionSummary`).

Every tool that rewrites a model (:func:`convert`, :func:`bnorm.freeze`, :func:`bnorm.unfreeze`,
:func:`bnorm.convert_sync_batchnorm`, :func:`bnorm.fold`) keeps returning the model, as before,
and reports what it did three ways: ``return_summary=True`` returns ``(model, summary)``; the
summary is logged at INFO level on the ``"bnorm"`` logger; and a :class:`LayersLeftWarning`
lists every batch-norm-like layer it left unchanged (so no layer is skipped silently).
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..modules import act as _act
from ..modules import batchnorm as _bn
from ..modules import frozen as _frozen

__all__ = ["ConversionSummary", "LayersLeftWarning", "convert", "retyped"]

logger = logging.getLogger("bnorm")


class LayersLeftWarning(UserWarning):
    """A model-rewriting tool left batch-norm-like layers unchanged (the message lists them)."""


def class_label(cls: type) -> str:
    """``package.ClassName``: short, and tells torch's, timm's and bnorm's classes apart."""
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


@dataclass
class ConversionSummary:
    """What a model-rewriting tool did.

    Attributes:
        action: the tool and its direction, e.g. ``"convert to bnorm"``.
        converted: ``"old class -> new class"`` to the number of layers changed so.
        left: ``(module name, class, reason)`` of every batch-norm-like layer left unchanged.
    """

    action: str
    converted: Counter[str] = field(default_factory=Counter)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def num_converted(self) -> int:
        return sum(self.converted.values())

    def __str__(self) -> str:
        lines = [f"{self.action}: {self.num_converted} layer(s) changed, {len(self.left)} left"]
        lines += [f"  {n} x {change}" for change, n in sorted(self.converted.items())]
        lines += [f"  left {name or '<model>'} ({cls}): {why}" for name, cls, why in self.left]
        return "\n".join(lines)


def is_batch_norm_like(m: nn.Module) -> bool:
    """Torch's batch norms and their subclasses, and frozen batch norms of any library."""
    return isinstance(m, _BatchNorm) or "BatchNorm" in type(m).__name__


# What a change function returns: the new module, or a reason (str) it left a layer, or None
# for a module it has nothing to do with.
Change = Callable[[nn.Module], "nn.Module | str | None"]


def rewrite(
    model: nn.Module, change: Change, action: str, *, stacklevel: int = 3
) -> tuple[nn.Module, ConversionSummary]:
    """Apply ``change`` to every module of ``model`` (children first), in place; report.

    Logs the summary on the ``"bnorm"`` logger and warns (:class:`LayersLeftWarning`) when a
    layer was left. Returns the (possibly new) root module and the summary.
    """
    summary = ConversionSummary(action)

    def visit(module: nn.Module, name: str) -> nn.Module:
        for child_name, child in list(module._modules.items()):
            if child is not None:
                module._modules[child_name] = visit(
                    child, f"{name}.{child_name}" if name else child_name
                )
        result = change(module)
        if isinstance(result, nn.Module) and result is not module:
            summary.converted[f"{class_label(type(module))} -> {class_label(type(result))}"] += 1
            return result
        if isinstance(result, str):
            summary.left.append((name, class_label(type(module)), result))
        return module

    new = visit(model, "")
    report(summary, stacklevel=stacklevel + 1)
    return new, summary


def report(summary: ConversionSummary, *, stacklevel: int = 3) -> None:
    """Log ``summary`` on the ``"bnorm"`` logger; warn if it left layers."""
    logger.info("%s", summary)
    if summary.left:
        listed = "; ".join(f"{n or '<model>'} ({c}): {why}" for n, c, why in summary.left)
        warnings.warn(
            f"{summary.action}: left {len(summary.left)} batch-norm-like layer(s) unchanged: "
            f"{listed}",
            LayersLeftWarning,
            stacklevel=stacklevel,
        )


def retyped(
    module: nn.Module,
    target: type[nn.Module],
    *,
    add: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> nn.Module:
    """A ``target`` instance holding ``module``'s state: the same tensors and child modules
    (``.act``, ``.drop``), fresh containers; ``add`` sets missing attributes, ``drop`` removes
    attributes the target does not have."""
    new = target.__new__(target)
    state = {
        k: (v.copy() if isinstance(v, dict | OrderedDict) else v)
        for k, v in module.__dict__.items()
        if k not in drop
    }
    for key, default in (add or {}).items():
        state.setdefault(key, default)
    # Modules hold their state in __dict__ only, so this is the whole module.
    object.__setattr__(new, "__dict__", state)
    return new


def _bnorm_only(cls: type) -> dict[str, object]:
    return dict(getattr(cls, "_bnorm_defaults", {}))


def _external(module: str, name: str) -> type | None:
    """``module.name`` if that library is importable, else None (timm and torchvision are
    optional: bnorm never needs them, and they may fail to import beside a CPU torch)."""
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = importlib.import_module(module)
        except Exception:  # not installed, or installed but broken: no such target
            return None
    return getattr(mod, name, None)


_TIMM = "timm.layers.norm_act"
_TORCHVISION = "torchvision.ops.misc"


def _key(cls: type) -> tuple[str, str]:
    return (cls.__module__, cls.__qualname__)


def _to_bnorm(m: nn.Module) -> nn.Module | str | None:
    cls = type(m)
    key = _key(cls)
    torch_to_bnorm = {
        nn.BatchNorm1d: _bn.BatchNorm1d,
        nn.BatchNorm2d: _bn.BatchNorm2d,
        nn.BatchNorm3d: _bn.BatchNorm3d,
    }
    if cls in torch_to_bnorm:
        target = torch_to_bnorm[cls]
        return retyped(m, target, add=_bnorm_only(target))
    if key == (_TIMM, "BatchNormAct2d"):
        return retyped(m, _act.BatchNormAct2d, add=_bnorm_only(_act.BatchNormAct2d))
    if key == (_TIMM, "SyncBatchNormAct"):
        from ..modules.sync import _as_sync

        return _as_sync(m, _act.SyncBatchNormAct, getattr(m, "process_group", None), None)
    if key in ((_TIMM, "FrozenBatchNormAct2d"), (_TORCHVISION, "FrozenBatchNorm2d")):
        target = _act.FrozenBatchNormAct2d if "Act" in cls.__name__ else _frozen.FrozenBatchNorm2d
        new = retyped(m, target, add={"_unfrozen": None})
        rm = m.running_mean
        new.num_features = int(rm.shape[0])
        new._buffers.setdefault(
            "num_batches_tracked", torch.zeros((), dtype=torch.long, device=rm.device)
        )
        return new
    if cls.__module__.split(".")[0] == "bnorm" or not is_batch_norm_like(m):
        return None
    if isinstance(m, nn.SyncBatchNorm):
        return "a SyncBatchNorm: bnorm.convert_sync_batchnorm converts it"
    if isinstance(m, _BatchNorm):
        return (
            "a subclass of torch's batch norm: its own code may compute something else than "
            "bnorm's layer would, so it is not replaced"
        )
    return "no bnorm equivalent"


def _to_torch(m: nn.Module) -> nn.Module | str | None:
    cls = type(m)
    bnorm_to_torch = {
        _bn.BatchNorm1d: nn.BatchNorm1d,
        _bn.BatchNorm2d: nn.BatchNorm2d,
        _bn.BatchNorm3d: nn.BatchNorm3d,
    }
    if cls in bnorm_to_torch:
        return retyped(m, bnorm_to_torch[cls], drop=tuple(_bnorm_only(cls)))
    external = {
        _act.BatchNormAct2d: (_TIMM, "BatchNormAct2d"),
        _act.SyncBatchNormAct: (_TIMM, "SyncBatchNormAct"),
        _act.FrozenBatchNormAct2d: (_TIMM, "FrozenBatchNormAct2d"),
        _frozen.FrozenBatchNorm2d: (_TORCHVISION, "FrozenBatchNorm2d"),
    }
    if cls in external:
        if getattr(m, "memory_efficient", False):
            return "memory_efficient=True has no timm equivalent"
        target = _external(*external[cls])
        if target is None:
            library = external[cls][0].split(".")[0]
            return (
                f"its equivalent is {library}'s {external[cls][1]}, and {library} is not importable"
            )
        if cls in (_act.FrozenBatchNormAct2d, _frozen.FrozenBatchNorm2d):
            new = retyped(m, target, drop=("_unfrozen",))
            new._buffers.pop("num_batches_tracked", None)
            return new
        drop = (*_bnorm_only(cls), "sync_id", "timeout", "_sync_calls")
        return retyped(m, target, drop=drop)
    if cls.__module__.split(".")[0] == "bnorm" and is_batch_norm_like(m):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "Sync" in cls.__name__:
            return (
                "torch's SyncBatchNorm runs on GPU only: load the state_dict into a model "
                "with local layers instead (the keys are the same)"
            )
        return "no torch or timm equivalent"
    return None


def convert(
    model: nn.Module, to: str = "bnorm", *, return_summary: bool = False
) -> nn.Module | tuple[nn.Module, ConversionSummary]:
    """Replace torch's and timm's batch-norm layers in ``model`` by bnorm's (``to="bnorm"``),
    or bnorm's by torch's and timm's (``to="torch"``).

    ``to="bnorm"``: ``torch.nn.BatchNorm1d/2d/3d`` become ``bnorm.BatchNorm1d/2d/3d``; timm's
    ``BatchNormAct2d``, ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d`` become
    :class:`bnorm.BatchNormAct2d`, :class:`bnorm.SyncBatchNormAct` and
    :class:`bnorm.FrozenBatchNormAct2d` (activation and drop modules kept); torchvision's
    ``FrozenBatchNorm2d`` becomes :class:`bnorm.FrozenBatchNorm2d` (bnorm's frozen layers hold a
    ``num_batches_tracked`` buffer, added as 0). ``to="torch"`` reverses each of these, to
    timm's and torchvision's classes where those libraries import (else the layers are left and
    listed); a memory-efficient ``BatchNormAct`` has no timm equivalent and is left.

    The new layers take over the old ones' parameters and buffers (the same tensor objects, so
    an optimizer built before still holds them), their train/eval mode and their hooks; the
    conversion is exact both ways. Only these exact classes are swapped: a subclass of torch's
    batch norm (which may compute something else), torch's ``SyncBatchNorm`` (see
    :func:`bnorm.convert_sync_batchnorm`) and other batch-norm-like layers are left, and a
    :class:`LayersLeftWarning` lists them. The model is changed in place and returned (if
    ``model`` is itself a batch-norm layer, the new layer is returned); with
    ``return_summary=True``, ``(model, summary)`` (a :class:`ConversionSummary`), which is
    also logged on the ``"bnorm"`` logger at INFO level.
    """
    if to == "bnorm":
        change = _to_bnorm
    elif to == "torch":
        change = _to_torch
    else:
        raise ValueError(f"convert: `to` must be 'bnorm' or 'torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    new, summary = rewrite(model, change, f"convert to {to}")
    return (new, summary) if return_summary else new
