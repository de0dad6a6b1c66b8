"""Tools that work on whole models: convert (torch <-> bnorm layers), fold (BN into the
preceding layer for inference), freeze/unfreeze (frozen BN), precise_bn (exact statistics),
doctor (what is wrong with a model's batch norm, measured)."""

from .convert import ConversionSummary as ConversionSummary
from .convert import LayersLeftWarning as LayersLeftWarning
from .convert import convert as convert
from .doctor import Diagnosis as Diagnosis
from .doctor import doctor as doctor
from .fold import fold as fold
from .fold import fold_weights as fold_weights
from .fold import fuse_custom_config as fuse_custom_config
from .freeze import freeze as freeze
from .freeze import unfreeze as unfreeze
from .precise import precise_bn as precise_bn
