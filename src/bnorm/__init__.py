"""bnorm: batch normalization for PyTorch, done right and proven.

Public API (everything else is private):

- layers: :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`
- functions: :mod:`bnorm.functional` (``batch_norm``)
- the NumPy float64 specification: :mod:`bnorm.reference`
- tools: :func:`convert`
- tools: :func:`fold` (batch norm merged into the preceding layer for inference)
- errors and warnings: :mod:`bnorm.errors`
"""

from . import errors as errors
from . import functional as functional
from . import reference as reference
from .errors import NonFiniteBatchError as NonFiniteBatchError
from .errors import NonFiniteBatchWarning as NonFiniteBatchWarning
from .modules import BatchNorm1d as BatchNorm1d
from .modules import BatchNorm2d as BatchNorm2d
from .modules import BatchNorm3d as BatchNorm3d
from .tools import convert as convert
from .tools import fold as fold

__version__ = "0.1.0"
