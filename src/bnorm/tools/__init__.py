"""Tools that work on whole models: conversion between torch's and bnorm's layers."""

from .convert import convert as convert
from .fold import fold as fold
from .fold import fold_weights as fold_weights
from .freeze import freeze as freeze
from .freeze import unfreeze as unfreeze
from .precise import precise_bn as precise_bn
