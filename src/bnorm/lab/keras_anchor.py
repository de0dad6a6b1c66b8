"""The article's own Keras code, run on Keras 3's torch backend: the anchor of the reproduction.

The ``article`` experiment reproduces the article's Keras network in PyTorch (:mod:`bnorm.demo`).
This module runs the article's code itself, so the report can show whether the reproduction
behaves like the original. The model is built and compiled exactly as printed::

    model = Sequential()
    model.add(Dense(50, input_dim=2, activation='relu', kernel_initializer='he_uniform'))
    model.add(Dense(1, activation='sigmoid'))
    model.compile(loss='binary_crossentropy', optimizer='adam')

The printed code never adds the ``BatchNormalization`` layer its text talks about, so three
variants are built, named as in :data:`bnorm.demo.VARIANTS`:

- ``no BN``: the code as printed;
- ``BN after ReLU``: ``model.add(BatchNormalization())`` after the first ``Dense``, which is
  what "following this, we add a BatchNormalization layer" does (``Dense`` applies the ReLU);
- ``BN before ReLU``: ``Dense(50, kernel_initializer='he_uniform')``, ``BatchNormalization()``,
  ``Activation('relu')``: "just after the Dense layer and before the activation function".

The article prints no ``fit`` call; the runs use what the PyTorch reproduction uses — the same
500/500 split of ``make_circles``, batch 32 (``fit``'s default), the *same batches in the same
order* (one ``train_on_batch`` per batch of the permutation :func:`bnorm.demo.train_one` draws
for the seed), and test accuracy in inference mode after every epoch. The weights are drawn by
Keras from ``keras.utils.set_random_seed(seed)``, so they differ from the PyTorch run's.

Keras is optional (``pip install 'bnorm[keras]'``). bnorm sets ``KERAS_BACKEND=torch`` before it
imports Keras, so no TensorFlow or JAX is needed; if Keras was already imported with another
backend, :func:`keras_status` says so and the anchor is skipped.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

VARIANTS = ("no BN", "BN after ReLU", "BN before ReLU")


def keras_status() -> tuple[Any | None, str]:
    """``(keras module, version)`` when Keras 3 runs on the torch backend, else ``(None, why)``."""
    if "keras" not in sys.modules:
        # Keras reads its backend once, at import; bnorm's choice must come first.
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError:
        return None, "keras is not installed (pip install 'bnorm[keras]')"
    backend = keras.backend.backend()
    if backend != "torch":
        return None, f"keras was imported with the {backend!r} backend, not 'torch'"
    if int(keras.__version__.split(".")[0]) < 3:
        return None, f"keras {keras.__version__} is older than Keras 3"
    return keras, keras.__version__


def build_article_model(keras: Any, variant: str) -> Any:
    """The article's Sequential model for ``variant`` (see the module docstring), compiled."""
    from keras.layers import Activation, BatchNormalization, Dense
    from keras.models import Sequential

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    with warnings.catch_warnings():
        # Keras 3 asks for an Input layer instead of input_dim; the article's code passes
        # input_dim, and it is run as printed.
        warnings.simplefilter("ignore", UserWarning)
        model = Sequential()
        if variant == "BN before ReLU":
            model.add(Dense(50, input_dim=2, kernel_initializer="he_uniform"))
            model.add(BatchNormalization())
            model.add(Activation("relu"))
        else:
            model.add(Dense(50, input_dim=2, activation="relu", kernel_initializer="he_uniform"))
            if variant == "BN after ReLU":
                model.add(BatchNormalization())
        model.add(Dense(1, activation="sigmoid"))
    model.compile(loss="binary_crossentropy", optimizer="adam")
    return model


def train_keras(
    variant: str,
    seed: int,
    *,
    epochs: int,
    batch_size: int,
    data: tuple[torch.Tensor, ...],
    target: float,
) -> dict[str, Any]:
    """Train the article's Keras model for ``variant`` from ``seed``; accuracies per epoch.

    Returns ``{"test_acc": [...], "train_acc": [...], "first_epoch": int | None, "seconds"}``
    with accuracies in inference mode (BatchNormalization's moving statistics), one per epoch,
    and ``first_epoch`` the first (1-based) epoch whose test accuracy reaches ``target``.
    """
    keras, why = keras_status()
    if keras is None:
        raise RuntimeError(why)
    xtr, ytr, xte, yte = (t.numpy() for t in data)
    keras.utils.set_random_seed(seed)
    model = build_article_model(keras, variant)
    # The batches and their order of the PyTorch run of the same seed (bnorm.demo.train_one).
    order = torch.Generator().manual_seed(seed)

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        with torch.no_grad():
            p = model(x, training=False)
        p = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
        return float(((p > 0.5) == (y > 0.5)).mean())

    test_acc: list[float] = []
    train_acc: list[float] = []
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=order).split(batch_size):
            i = idx.numpy()
            model.train_on_batch(xtr[i], ytr[i])
        train_acc.append(accuracy(xtr, ytr))
        test_acc.append(accuracy(xte, yte))
    first = next((i + 1 for i, a in enumerate(test_acc) if a >= target), None)
    return {
        "test_acc": test_acc,
        "train_acc": train_acc,
        "first_epoch": first,
        "seconds": time.perf_counter() - start,
    }
