"""bnorm's nn.Module layers."""

from .batchnorm import BatchNorm1d as BatchNorm1d
from .batchnorm import BatchNorm2d as BatchNorm2d
from .batchnorm import BatchNorm3d as BatchNorm3d
from .sync import SyncBatchNorm as SyncBatchNorm
from .sync import convert_sync_batchnorm as convert_sync_batchnorm
