"""The lab's offline datasets: shapes, label ranges, every class in both splits."""

from __future__ import annotations

import torch

from bnorm.lab.data import circles, mnist1d, mnist5k


def _check(data, features, n_train, n_test):
    assert data.x_train.shape == (n_train, *features) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (n_test, *features)
    for y in (data.y_train, data.y_test):
        assert y.dtype == torch.int64
        assert set(y.tolist()) == set(range(data.num_classes))  # every class in each split


def test_mnist5k_is_real_digits_with_balanced_splits():
    data = mnist5k()
    _check(data, (784,), 4000, 1000)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) == 1.0
    counts = torch.bincount(data.y_test, minlength=10)
    assert int(counts.min()) >= 70 and int(counts.max()) <= 130  # ~100 each after the shuffle
    # digits are mostly background: about a fifth of the pixels are ink
    assert 0.1 < float((data.x_train > 0.5).float().mean()) < 0.3


def test_mnist1d_and_circles():
    _check(mnist1d(), (40,), 4000, 1000)
    _check(circles(), (2,), 500, 500)
