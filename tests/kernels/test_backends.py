"""Every kernel backend, step by step, against the NumPy reference in float64."""

import numpy as np
import pytest
import torch
from helpers import assert_close, channels_last, is_channels_last, np64

from bnorm import reference as ref
from bnorm.kernels import BACKENDS

BACKEND_NAMES = sorted(BACKENDS)
CASES = [
    ((7, 3), False),
    ((4, 5, 6), False),
    ((3, 4, 5, 2), False),
    ((3, 4, 5, 2), True),
    ((2, 3, 2, 3, 4), False),
    ((2, 3, 2, 3, 4), True),
    ((2, 1, 1, 1), False),  # one channel, spatial 1
]


def _data(shape, cl, dtype=torch.float64, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    return channels_last(x) if cl else x


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("shape,cl", CASES)
def test_statistics(name, shape, cl):
    x = _data(shape, cl, offset=3.0)
    mean, var = BACKENDS[name].statistics(x)
    stats = ref.batch_stats(np64(x))
    assert mean.dtype == var.dtype == torch.float64
    assert_close(mean, stats.mean, atol=1e-12, what="mean")
    assert_close(var, stats.var, atol=1e-12, what="var")


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("shape,cl", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_transform(name, shape, cl, affine):
    x = _data(shape, cl)
    c = shape[1]
    mean, var = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    w, b = (torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64))
    w, b = (w, b) if affine else (None, None)
    y = BACKENDS[name].transform(x, mean, torch.rsqrt(var + 1e-5), w, b)
    expected = ref.forward_eval(np64(x), np64(mean), np64(var), np64(w), np64(b), eps=1e-5)
    assert_close(y, expected, atol=1e-12)
    assert y.dtype == x.dtype
    assert is_channels_last(y) == cl or not cl


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("shape,cl", CASES)
def test_backward_steps(name, shape, cl):
    backend = BACKENDS[name]
    x = _data(shape, cl, seed=1)
    dy = _data(shape, cl, seed=2)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64)
    _y_ref, cache = ref.forward_train(np64(x), np64(w), None, eps=1e-5)
    dx_ref, dw_ref, db_ref = ref.backward(np64(dy), cache)

    mean, var = backend.statistics(x)
    invstd = torch.rsqrt(var + 1e-5)
    sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean)
    assert_close(sum_dy, db_ref, atol=1e-11, what="sum dy")
    assert_close(sum_dy_xmu * invstd, dw_ref, atol=1e-11, what="sum dy*xhat")
    count = x.numel() // c
    dx = backend.backward_elementwise(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
    assert_close(dx, dx_ref, atol=1e-10, what="dx")
    assert not cl or is_channels_last(dx)


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_use_float32_statistics(name, dtype):
    x = _data((16, 3, 4, 4), False, dtype=dtype, offset=2.0)
    mean, var = BACKENDS[name].statistics(x)
    stats = ref.batch_stats(np64(x))  # statistics of the very same low-precision values
    assert_close(mean, stats.mean, atol=1e-6, rtol=1e-6)
    assert_close(var, stats.var, atol=1e-6, rtol=1e-5)
    y = BACKENDS[name].transform(x, mean, torch.rsqrt(var + 1e-5), None, None)
    assert y.dtype == dtype
    expected = ref.forward_train(np64(x))[0]
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding to the output dtype
    assert_close(y, expected, atol=tol * 4)


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_statistics_keep_precision_far_from_zero(name, offset):
    x = _data((32, 4, 8, 8), False, dtype=torch.float32, offset=offset)
    mean, var = BACKENDS[name].statistics(x)
    stats = ref.batch_stats(np64(x))
    # within 1e-6 standard deviations (sigma = 2 here); a plain fp32 mean is off by ~ulp(offset)
    assert_close(mean, stats.mean, atol=2e-6)
    np.testing.assert_allclose(np64(var), stats.var, rtol=1e-5)
