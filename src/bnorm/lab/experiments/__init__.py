"""The lab's experiments, one file each, in the order of the report.

Each module defines ``EXPERIMENT`` (a :class:`bnorm.lab.experiment.Experiment`).
"""

from __future__ import annotations

import importlib

from ..experiment import Experiment

# Module names in report order; the experiment's command-line name is its EXPERIMENT.name.
MODULES: tuple[str, ...] = (
    "article",
    "ioffe_fig1",
    "learning_rate",
    "init",
    "regularization",
    "sigmoid",
    "batch_size",
    "rnn",
    "train_vs_inference",
    "cost",
)


def all_experiments() -> list[Experiment]:
    """Every experiment, in report order."""
    return [importlib.import_module(f"{__name__}.{m}").EXPERIMENT for m in MODULES]


def get(name: str) -> Experiment:
    """The experiment called ``name`` (its command-line name, e.g. ``ioffe-fig1``)."""
    found = {e.name: e for e in all_experiments()}
    if name not in found:
        raise KeyError(f"no lab experiment named {name!r}; choose one of: {', '.join(found)}")
    return found[name]
