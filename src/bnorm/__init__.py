"""bnorm: batch normalization for PyTorch, done right and proven.

Public API (everything else is private):

- drop-in layers: :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`
- functions: :mod:`bnorm.functional` (``batch_norm``)
- the operators (``torch.ops.bnorm.*``, a C++ extension) and their Python side: :mod:`bnorm.ops`
- the NumPy float64 specification: :mod:`bnorm.reference`, and of the remedies
  :mod:`bnorm.reference_remedies`
- remedies for batch norm's limitations: :class:`BatchRenorm1d`/``2d``/``3d`` (with
  :func:`linear_ramp`), :class:`GhostBatchNorm1d`/``2d``, :class:`RecurrentBatchNorm1d`,
  :class:`BNLSTMCell`, :class:`BNLSTM`, :class:`FrozenBatchNorm1d`/``2d``/``3d``,
  :class:`BatchNormAct1d`/``2d`` (timm's interface), :class:`FrozenBatchNormAct1d`/``2d``
- data-parallel: :class:`SyncBatchNorm`, :class:`SyncBatchNormAct`,
  :func:`convert_sync_batchnorm`, :mod:`bnorm.distributed`
- tools on whole models: :func:`convert`, :func:`fold`, :func:`freeze`/:func:`unfreeze`,
  :func:`precise_bn`, :func:`doctor` (a :class:`Diagnosis` of a model's batch norm); their
  report :class:`ConversionSummary` and :class:`LayersLeftWarning`; :func:`fuse_custom_config`
  for torch.ao's ``fuse_modules``
- errors and warnings: :mod:`bnorm.errors`
- the lab (experiments, report): :mod:`bnorm.lab`, imported on demand (it needs the ``lab`` extra)

Importing :mod:`bnorm` is cheap: the names above are imported on first use (PEP 562 module
``__getattr__``), so that ``bnorm --help`` answers without importing torch. ``from bnorm import
BatchNorm2d``, ``bnorm.BatchNorm2d`` and ``import bnorm.functional`` work as with eager imports.
Where torch is already imported, ``import bnorm`` registers the operators at once (so that
``torch.jit.load`` finds ``torch.ops.bnorm.*`` in a saved model); otherwise the first use of
any layer does, or ``import bnorm.modules``.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    "NonFiniteBatchError": "errors",
    "NonFiniteBatchWarning": "errors",
    "SyncBatchNormError": "errors",
    "BNLSTM": "modules",
    "BatchNorm1d": "modules",
    "BatchNorm2d": "modules",
    "BatchNorm3d": "modules",
    "BatchNormAct1d": "modules",
    "BatchNormAct2d": "modules",
    "BatchRenorm1d": "modules",
    "BatchRenorm2d": "modules",
    "BatchRenorm3d": "modules",
    "BNLSTMCell": "modules",
    "FrozenBatchNorm1d": "modules",
    "FrozenBatchNorm2d": "modules",
    "FrozenBatchNorm3d": "modules",
    "FrozenBatchNormAct1d": "modules",
    "FrozenBatchNormAct2d": "modules",
    "GhostBatchNorm1d": "modules",
    "GhostBatchNorm2d": "modules",
    "RecurrentBatchNorm1d": "modules",
    "SyncBatchNorm": "modules",
    "SyncBatchNormAct": "modules",
    "convert_sync_batchnorm": "modules",
    "linear_ramp": "modules.renorm",
    "ConversionSummary": "tools",
    "Diagnosis": "tools",
    "LayersLeftWarning": "tools",
    "convert": "tools",
    "doctor": "tools",
    "fold": "tools",
    "freeze": "tools",
    "fuse_custom_config": "tools",
    "precise_bn": "tools",
    "unfreeze": "tools",
}
#: public submodules, importable as attributes (``bnorm.functional``)
_SUBMODULES: tuple[str, ...] = (
    "distributed",
    "errors",
    "functional",
    "ops",
    "reference",
    "reference_remedies",
)

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    """Import a public name on first access and keep it as a module attribute.

    Any other submodule of the package (``bnorm.lab``, ...) is imported on attribute access
    too, as it would be after an eager ``import bnorm.<name>``.
    """
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of its own imports failed
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if "torch" in sys.modules:  # torch is loaded anyway: register the operators now
    from . import modules as modules  # batch_renorm, ghost_batch_norm: defined with the layers
    from . import ops as ops

if TYPE_CHECKING:  # the same names, for type checkers and documentation tools
    from . import distributed as distributed
    from . import errors as errors
    from . import functional as functional
    from . import ops as ops
    from . import reference as reference
    from . import reference_remedies as reference_remedies
    from .errors import NonFiniteBatchError as NonFiniteBatchError
    from .errors import NonFiniteBatchWarning as NonFiniteBatchWarning
    from .errors import SyncBatchNormError as SyncBatchNormError
    from .modules import BNLSTM as BNLSTM
    from .modules import BatchNorm1d as BatchNorm1d
    from .modules import BatchNorm2d as BatchNorm2d
    from .modules import BatchNorm3d as BatchNorm3d
    from .modules import BatchNormAct1d as BatchNormAct1d
    from .modules import BatchNormAct2d as BatchNormAct2d
    from .modules import BatchRenorm1d as BatchRenorm1d
    from .modules import BatchRenorm2d as BatchRenorm2d
    from .modules import BatchRenorm3d as BatchRenorm3d
    from .modules import BNLSTMCell as BNLSTMCell
    from .modules import FrozenBatchNorm1d as FrozenBatchNorm1d
    from .modules import FrozenBatchNorm2d as FrozenBatchNorm2d
    from .modules import FrozenBatchNorm3d as FrozenBatchNorm3d
    from .modules import FrozenBatchNormAct1d as FrozenBatchNormAct1d
    from .modules import FrozenBatchNormAct2d as FrozenBatchNormAct2d
    from .modules import GhostBatchNorm1d as GhostBatchNorm1d
    from .modules import GhostBatchNorm2d as GhostBatchNorm2d
    from .modules import RecurrentBatchNorm1d as RecurrentBatchNorm1d
    from .modules import SyncBatchNorm as SyncBatchNorm
    from .modules import SyncBatchNormAct as SyncBatchNormAct
    from .modules import convert_sync_batchnorm as convert_sync_batchnorm
    from .modules.renorm import linear_ramp as linear_ramp
    from .tools import ConversionSummary as ConversionSummary
    from .tools import Diagnosis as Diagnosis
    from .tools import LayersLeftWarning as LayersLeftWarning
    from .tools import convert as convert
    from .tools import doctor as doctor
    from .tools import fold as fold
    from .tools import freeze as freeze
    from .tools import fuse_custom_config as fuse_custom_config
    from .tools import precise_bn as precise_bn
    from .tools import unfreeze as unfreeze
