"""bnorm: batch normalization for PyTorch, done right and proven.

Public API (everything else is private):

- drop-in layers: :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`
- functions: :mod:`bnorm.functional` (``batch_norm``)
- the NumPy float64 specification: :mod:`bnorm.reference`, and of the remedies
  :mod:`bnorm.reference_remedies`
- remedies for batch norm's limitations: :class:`BatchRenorm1d`/``2d``/``3d`` (with
  :func:`linear_ramp`), :class:`GhostBatchNorm1d`/``2d``, :class:`RecurrentBatchNorm1d`,
  :class:`BNLSTMCell`, :class:`BNLSTM`, :class:`FrozenBatchNorm1d`/``2d``/``3d``,
  :class:`BatchNormAct1d`/``2d``, :class:`FrozenBatchNormAct1d`/``2d``
- data-parallel: :class:`SyncBatchNorm`, :class:`SyncBatchNormAct`,
  :func:`convert_sync_batchnorm`, :mod:`bnorm.distributed`
- tools on whole models: :func:`convert`, :func:`fold`, :func:`freeze`/:func:`unfreeze`,
  :func:`precise_bn`, :func:`doctor` (a :class:`Diagnosis` of a model's batch norm); their report :class:`ConversionSummary` and :class:`LayersLeftWarning`;
  :func:`fuse_custom_config` for torch.ao's ``fuse_modules``
- the operators (``torch.ops.bnorm.*``) and their Python side: :mod:`bnorm.ops`
- errors and warnings: :mod:`bnorm.errors`
- the lab (experiments, report): :mod:`bnorm.lab`, imported on demand (it needs the ``lab`` extra)
"""

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

__version__ = "0.1.0"
