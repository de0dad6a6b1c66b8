"""bnorm's nn.Module layers."""

from .act import BatchNormAct1d as BatchNormAct1d
from .act import BatchNormAct2d as BatchNormAct2d
from .act import FrozenBatchNormAct1d as FrozenBatchNormAct1d
from .act import FrozenBatchNormAct2d as FrozenBatchNormAct2d
from .act import SyncBatchNormAct as SyncBatchNormAct
from .batchnorm import BatchNorm1d as BatchNorm1d
from .batchnorm import BatchNorm2d as BatchNorm2d
from .batchnorm import BatchNorm3d as BatchNorm3d
from .frozen import FrozenBatchNorm1d as FrozenBatchNorm1d
from .frozen import FrozenBatchNorm2d as FrozenBatchNorm2d
from .frozen import FrozenBatchNorm3d as FrozenBatchNorm3d
from .ghost import GhostBatchNorm1d as GhostBatchNorm1d
from .ghost import GhostBatchNorm2d as GhostBatchNorm2d
from .recurrent import BNLSTM as BNLSTM
from .recurrent import BNLSTMCell as BNLSTMCell
from .recurrent import RecurrentBatchNorm1d as RecurrentBatchNorm1d
from .renorm import BatchRenorm1d as BatchRenorm1d
from .renorm import BatchRenorm2d as BatchRenorm2d
from .renorm import BatchRenorm3d as BatchRenorm3d
from .sync import SyncBatchNorm as SyncBatchNorm
from .sync import convert_sync_batchnorm as convert_sync_batchnorm
