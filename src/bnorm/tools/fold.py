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

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["fold", "fold_weights"]

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


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, _FOLDABLE) or not isinstance(bn, _BatchNorm):
        return False
    if bn.training or not bn.track_running_stats or bn.running_mean is None:
        return False  # training mode or batch statistics in eval: not a fixed affine map
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return bn.num_features == out and layer.weight.device == bn.running_mean.device


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


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every foldable eval-mode batch norm merged into its layer.

    A batch norm (torch's or bnorm's ``BatchNorm1d/2d/3d``) is folded when it *directly
    follows* a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (any ``groups``, depthwise
    included) or ``Linear``: in the graph traced by :mod:`torch.fx`, the batch norm's only
    input is that layer's output, the output has no other user, and each module is called
    once. Models fx cannot trace fall back to consecutive children of ``nn.Sequential``
    containers. The layer gets the folded weight and bias (see :func:`fold_weights`), and the
    batch norm is replaced by ``nn.Identity``, so module names (and the rest of the
    ``state_dict``) stay as they were.

    Not folded (left in place): batch norm in training mode (``model.train()``: it normalizes
    with batch statistics), with ``track_running_stats=False`` (it uses batch statistics in
    evaluation too), or not preceded by a foldable layer. ``affine=False`` folds with
    ``gamma = 1, beta = 0``. A ``Linear`` followed by ``BatchNorm1d`` is folded on the
    assumption that the pair sees ``(N, features)`` inputs, as such a pair normally does.

    The original model is not modified. In evaluation the folded model's outputs equal
    ``model.eval()``'s up to rounding (the fold is computed in float64).
    """
    folded = copy.deepcopy(model)
    pairs = _pairs_from_graph(folded)
    if pairs is None:
        pairs = _pairs_from_sequentials(folded)
    for layer_name, bn_name in pairs:
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        if _can_fold(layer, bn):
            _fold_pair(layer, bn)  # type: ignore[arg-type]
            _set_submodule(folded, bn_name, nn.Identity())
    return folded
