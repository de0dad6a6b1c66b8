r"""Fold evaluation-mode batch norm into the preceding convolution or linear layer.

In evaluation, batch norm is a fixed per-channel affine map,

.. math::  \mathrm{BN}(z) = (z - \mu_r)\,s + \beta, \qquad s = \gamma / \sqrt{\sigma_r^2 + \epsilon}

(:math:`\mu_r, \sigma_r^2` the running statistics), so after a layer ``z = W * x + b`` that is
linear in its input it can be merged into the layer: ``W' = W s`` (per output channel) and
``b' = (b - \mu_r) s + \beta``. The folded network computes the same function with one pass
less over memory per batch-norm layer.

:func:`fold_weights` is the tensor-level math; :func:`fold` applies it to a whole model.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..modules import batchnorm as _bn
from .convert import ConversionSummary, class_label, is_batch_norm_like, report, retyped

__all__ = ["fold", "fold_weights", "fuse_custom_config"]

_FOLDABLE = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    r"""The weight and bias of ``layer`` followed by eval-mode batch norm, as one layer.

    ``W' = W \cdot s`` along the output channels and ``b' = (b - \mu_r) s + \beta`` with
    ``s = \gamma / \sqrt{\sigma_r^2 + \epsilon}``; computed in float64, returned in the weight's
    dtype. ``bias=None`` is a zero bias; ``bn_weight``/``bn_bias`` ``None`` (``affine=False``)
    mean 1 and 0.

    Shapes: for a convolution or ``nn.Linear`` the output channels are dim 0 of ``weight``
    (``(out, in/groups, *k)`` or ``(out, in)``); for a transposed convolution
    (``transposed=True``) the weight is ``(in, out/groups, *k)``, so output channel
    ``g * out/groups + j`` is column ``j`` of the ``g``-th block of ``in/groups`` rows.
    ``running_mean`` etc. are ``(out,)``.
    """
    dtype = weight.dtype
    w = weight.detach().to(torch.float64)
    out = running_mean.numel()
    gamma = torch.ones(out, dtype=torch.float64) if bn_weight is None else bn_weight.detach()
    beta = torch.zeros(out, dtype=torch.float64) if bn_bias is None else bn_bias.detach()
    b = torch.zeros(out, dtype=torch.float64) if bias is None else bias.detach()
    scale = gamma.to(torch.float64) / torch.sqrt(running_var.detach().to(torch.float64) + eps)
    kernel = (1,) * (w.dim() - 2)
    if transposed:
        rows = w.shape[0]
        grouped = w.reshape(groups, rows // groups, out // groups, *w.shape[2:])
        grouped = grouped * scale.reshape(groups, 1, out // groups, *kernel)
        new_w = grouped.reshape(w.shape)
    else:
        new_w = w * scale.reshape(out, 1, *kernel)
    new_b = (b.to(torch.float64) - running_mean.detach().to(torch.float64)) * scale + beta.to(
        torch.float64
    )
    return new_w.to(dtype), new_b.to(dtype)


def _why_not(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer``, or None if it can."""
    if not isinstance(layer, _FOLDABLE):
        return f"follows {class_label(type(layer))}, not a convolution or linear layer"
    if bn.training:
        return "in training mode (it normalizes with batch statistics): call model.eval()"
    if not bn.track_running_stats or bn.running_mean is None:
        return "no running statistics (it uses batch statistics in evaluation too)"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out:
        return f"{bn.num_features} channels after a layer of {out}"
    if layer.weight.device != bn.running_mean.device:
        return "on another device than the layer before it"
    return None


def _fold_pair(layer: nn.Module, bn: _BatchNorm) -> None:
    transposed = isinstance(layer, _TRANSPOSED)
    groups = 1 if isinstance(layer, nn.Linear) else layer.groups
    assert bn.running_mean is not None and bn.running_var is not None
    new_w, new_b = fold_weights(
        layer.weight,
        layer.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        transposed=transposed,
        groups=groups,
    )
    layer.weight = nn.Parameter(new_w, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(new_b, requires_grad=layer.weight.requires_grad)


class _LeafTracer(torch.fx.Tracer):
    """Keeps every batch norm (bnorm's subclasses included) and foldable layer a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (_BatchNorm, *_FOLDABLE)) or super().is_leaf_module(
            m, module_qualified_name
        )


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]] | None:
    """(layer, bn) module names where the bn's only input is the layer's output and that output
    has no other user; ``None`` if the model cannot be traced."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # any untraceable forward: fall back to nn.Sequential order
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue  # a shared module or a used intermediate: folding would change them
        pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = [name for name, _ in module.named_children()]
        for a, b in itertools.pairwise(names):
            pairs.append((f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b))
    return pairs


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _after_fold(bn: nn.Module) -> nn.Module:
    """What stands in the batch norm's place: ``nn.Identity``, or for a batch norm +
    activation layer its drop and activation (under their names, so their keys stay)."""
    act = bn._modules.get("act")
    if not isinstance(act, nn.Module):
        return nn.Identity()
    drop = bn._modules.get("drop") or nn.Identity()
    return nn.Sequential(OrderedDict(drop=drop, act=act))


def fold(
    model: nn.Module, *, return_summary: bool = False
) -> nn.Module | tuple[nn.Module, ConversionSummary]:
    """A copy of ``model`` with every foldable eval-mode batch norm merged into its layer.

    A batch norm (torch's or bnorm's ``BatchNorm1d/2d/3d``) is folded when it *directly
    follows* a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (any ``groups``, depthwise
    included) or ``Linear``: in the graph traced by :mod:`torch.fx`, the batch norm's only
    input is that layer's output, the output has no other user, and each module is called
    once. Models fx cannot trace fall back to consecutive children of ``nn.Sequential``
    containers. The layer gets the folded weight and bias (see :func:`fold_weights`), and the
    batch norm is replaced by ``nn.Identity``, so module names (and the rest of the
    ``state_dict``) stay as they were. A batch norm + activation layer (bnorm's or timm's
    ``BatchNormAct``) is folded the same way and replaced by ``nn.Sequential(drop=...,
    act=...)`` holding its own drop and activation modules.

    Not folded (left in place): batch norm in training mode (``model.train()``: it normalizes
    with batch statistics), with ``track_running_stats=False`` (it uses batch statistics in
    evaluation too), or not preceded by a foldable layer. ``affine=False`` folds with
    ``gamma = 1, beta = 0``. A ``Linear`` followed by ``BatchNorm1d`` is folded on the
    assumption that the pair sees ``(N, features)`` inputs, as such a pair normally does.

    Every batch-norm-like layer not folded is listed, with the reason, in a
    :class:`bnorm.LayersLeftWarning` and the summary (``return_summary=True``
    returns ``(folded, summary)``; the summary is also logged on the ``"bnorm"`` logger).

    The original model is not modified. In evaluation the folded model's outputs equal
    ``model.eval()``'s up to rounding (the fold is computed in float64).
    """
    folded = copy.deepcopy(model)
    pairs = _pairs_from_graph(folded)
    if pairs is None:
        pairs = _pairs_from_sequentials(folded)
    summary = ConversionSummary("fold")
    reasons: dict[int, str] = {}  # id(bn) -> why it was not folded
    for layer_name, bn_name in pairs:
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        if not isinstance(bn, _BatchNorm):
            continue
        why = _why_not(layer, bn)
        if why is None:
            _fold_pair(layer, bn)  # type: ignore[arg-type]
            _set_submodule(folded, bn_name, _after_fold(bn))
            summary.converted[
                f"{class_label(type(bn))} -> folded into {class_label(type(layer))}"
            ] += 1
        else:
            reasons.setdefault(id(bn), why)
    for name, m in folded.named_modules():
        if not is_batch_norm_like(m):
            continue
        if isinstance(m, _BatchNorm):
            why = reasons.get(
                id(m),
                "not directly after a convolution or linear layer whose output only it uses",
            )
        else:
            why = "not a batch norm fold knows (frozen, or another library's)"
        summary.left.append((name, class_label(type(m)), why))
    report(summary, stacklevel=3)
    return (folded, summary) if return_summary else folded


_TORCH_OF = {
    _bn.BatchNorm1d: nn.BatchNorm1d,
    _bn.BatchNorm2d: nn.BatchNorm2d,
    _bn.BatchNorm3d: nn.BatchNorm3d,
}


def _as_torch_bn(m: nn.Module) -> nn.Module:
    cls = type(m)
    if cls not in _TORCH_OF:
        return m
    return retyped(m, _TORCH_OF[cls], drop=tuple(_bn._BatchNormBase._bnorm_defaults))


def _delegating(types: tuple[type[nn.Module], ...]) -> Callable[..., nn.Module]:
    """A torch.ao fuser method for ``types`` (holding a bnorm batch norm): torch's own fuser for
    the same pattern with torch's batch norm, applied to the layers with the batch norm retyped
    to torch's class (the same tensors: bnorm's layer is torch's plus checks and kernels)."""
    from torch.ao.quantization.fuser_method_mappings import get_fuser_method

    torch_types = tuple(_TORCH_OF.get(t, t) for t in types)
    torch_fuser = get_fuser_method(torch_types)

    def fuser(is_qat: bool, *mods: nn.Module) -> nn.Module:
        return torch_fuser(is_qat, *(_as_torch_bn(m) for m in mods))

    return fuser


def fuse_custom_config() -> dict[str, Any]:
    """``fuse_custom_config_dict`` for ``torch.ao.quantization.fuse_modules`` and
    ``fuse_modules_qat`` that fuses bnorm's batch norms as torch's are fused.

    torch.ao finds a fuser by the exact classes of the modules, so bnorm's ``BatchNorm1d/2d/3d``
    (subclasses of torch's) need their own entries: ``(ConvNd, BatchNormNd)``,
    ``(ConvNd, BatchNormNd, ReLU)``, ``(Linear, BatchNorm1d)`` and ``(BatchNormNd, ReLU)``. Each
    runs torch's fuser on the batch norm retyped to torch's class, so the fused modules
    (``nn.intrinsic.ConvBn2d`` ... for QAT, folded convolutions for inference) are torch's.
    Usage::

        fuse_modules(model, [["conv", "bn", "relu"]],
                     fuse_custom_config_dict=bnorm.fuse_custom_config())

    The other route, for every torch.ao and torch.fx tool (``prepare_fx``/``convert_fx``,
    ``torch.fx.experimental.optimization.fuse``): ``bnorm.convert(model, to="torch")`` first.
    """
    mapping: dict[tuple[type[nn.Module], ...], Callable[..., nn.Module]] = {}
    convs = (
        (nn.Conv1d, _bn.BatchNorm1d),
        (nn.Conv2d, _bn.BatchNorm2d),
        (nn.Conv3d, _bn.BatchNorm3d),
    )
    patterns = [(nn.Linear, _bn.BatchNorm1d)]
    for conv, bn in convs:
        patterns += [(conv, bn), (conv, bn, nn.ReLU), (bn, nn.ReLU)]
    for types in patterns:
        try:
            mapping[types] = _delegating(types)
        except AssertionError:  # torch has no fuser for this pattern either (e.g. BN1d+ReLU)
            continue
    return {"additional_fuser_method_mapping": mapping}
