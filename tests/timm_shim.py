"""Import timm for the tests on a machine whose torch is a CPU build without torchvision.

timm's model and layer code needs nothing from torchvision but one class,
``torchvision.ops.misc.FrozenBatchNorm2d`` (imported by ``timm.layers.norm_act`` and used by its
``freeze_batch_norm_2d``); ``timm.data`` imports torchvision's transforms and datasets at import
time but the models never call them. PyPI's torchvision wheel is a CUDA build, which fails to
import beside a CPU torch ("operator torchvision::nms does not exist"), so the project installs
timm alone (``pip install --no-deps timm``) and, when torchvision does not import, these tests
put a stand-in in front of it: a real ``FrozenBatchNorm2d`` (torchvision's math: buffers
``weight, bias, running_mean, running_var``, ``y = x * w/sqrt(rv + eps) + (b - rm * w/sqrt(rv +
eps))``) and, for every other name, placeholders that raise if they are ever called. Where a
working torchvision is installed, timm is imported as it is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: batch norm with fixed statistics and affine."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


class _Placeholder:
    """Any torchvision name timm touches at import time but the models never use."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a test stand-in for torchvision, not available")

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision" and not fullname.startswith("torchvision."):
            return None
        if fullname.startswith("torchvision.models"):
            return None  # timm's _fx.py catches this ImportError: no FX feature extraction
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        if module.__name__ == "torchvision.ops.misc":
            module.FrozenBatchNorm2d = FrozenBatchNorm2d


_result: tuple[types.ModuleType | None, str] | None = None


def import_timm() -> tuple[types.ModuleType | None, str]:
    """``(timm, how)`` or ``(None, why not)``; imports once."""
    global _result
    if _result is not None:
        return _result
    if importlib.util.find_spec("timm") is None:
        _result = (None, "timm is not installed (pip install --no-deps 'timm>=1.0')")
        return _result
    try:
        import torchvision  # noqa: F401

        how = "with torchvision"
    except Exception:  # missing, or a CUDA build that fails to import beside a CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        finder = _Finder()
        sys.meta_path.insert(0, finder)
        how = "with the torchvision stand-in of tests/timm_shim.py"
    try:
        timm = importlib.import_module("timm")
    except Exception as e:
        _result = (None, f"timm does not import ({type(e).__name__}: {e})")
        return _result
    finally:
        if how != "with torchvision":
            # timm holds what it took; the rest of the session sees no torchvision, as before
            sys.meta_path.remove(finder)
            for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
                del sys.modules[name]
    _result = (timm, how)
    return _result
