"""bnorm.functional.batch_norm against the NumPy reference (float64) and torch (fp32)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SHAPES, assert_close, channels_last, exact_normalize, is_channels_last, np64
from hypothesis import given
from hypothesis import strategies as st

import bnorm
from bnorm import reference as ref
from bnorm.errors import (
    BatchNormDtypeError,
    BatchNormShapeError,
    NonFiniteBatchError,
    NonFiniteBatchWarning,
)
from bnorm.functional import batch_norm


def _params(c, dtype=torch.float64, affine=True, requires_grad=True):
    if not affine:
        return None, None
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(c, dtype=dtype).requires_grad_(requires_grad)
    return w, b


# --- against the reference, float64 ------------------------------------------------------


LAYOUTS = [(name, False) for name in SHAPES] + [("N,C,H,W", True), ("N,C,D,H,W", True)]


@pytest.mark.parametrize("layout,cl", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_training_matches_reference(layout, cl, affine):
    shape = SHAPES[layout]
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    x = (channels_last(x) if cl else x).requires_grad_()
    w, b = _params(shape[1], affine=affine)
    rm, rv = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-4)
    dy = torch.randn(shape, dtype=torch.float64)
    y.backward(dy)

    y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b), eps=1e-4)
    dx_ref, dw_ref, db_ref = ref.backward(np64(dy), cache)
    rm_ref, rv_ref, _ = ref.update_running_stats(
        np.zeros(shape[1]), np.ones(shape[1]), cache.stats, 0.2
    )
    assert_close(y, y_ref, atol=1e-12, what="y")
    assert_close(x.grad, dx_ref, atol=1e-11, what="dx")
    assert_close(rm, rm_ref, atol=1e-13, what="running_mean")
    assert_close(rv, rv_ref, atol=1e-13, what="running_var")
    if affine:
        assert_close(w.grad, dw_ref, atol=1e-11, what="dweight")
        assert_close(b.grad, db_ref, atol=1e-11, what="dbias")
    assert is_channels_last(y) if cl else y.is_contiguous()


@pytest.mark.parametrize("layout", list(SHAPES))
def test_eval_matches_reference(layout):
    shape = SHAPES[layout]
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w, b = _params(c)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.1
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    dy = torch.randn(shape, dtype=torch.float64)
    y.backward(dy)
    assert_close(
        y, ref.forward_eval(np64(x), np64(rm), np64(rv), np64(w), np64(b), 1e-3), atol=1e-12
    )
    dx, dw, db = ref.backward_eval(np64(dy), np64(x), np64(rm), np64(rv), np64(w), 1e-3)
    assert_close(x.grad, dx, atol=1e-12)
    assert_close(w.grad, dw, atol=1e-11)
    assert_close(b.grad, db, atol=1e-11)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@given(
    rank=st.integers(2, 5),
    n=st.integers(2, 5),
    c=st.integers(1, 4),
    spatial=st.integers(1, 3),
    offset=st.sampled_from([0.0, -7.0, 1e3]),
    scale=st.sampled_from([1e-2, 1.0, 50.0]),
    training=st.booleans(),
    affine=st.booleans(),
    momentum=st.sampled_from([0.0, 0.1, 1.0]),
    cl=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_offsets_modes(
    rank, n, c, spatial, offset, scale, training, affine, momentum, cl, seed
):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c) + (spatial,) * (rank - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    if cl and rank >= 4:
        x = channels_last(x)
    x.requires_grad_()
    w, b = _params(c, affine=affine)
    rm = torch.randn(c, generator=g, dtype=torch.float64)
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    rm_in, rv_in = np64(rm), np64(rv)
    y = batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=1e-5)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    y.backward(dy)
    if training:
        y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b), 1e-5)
        dx_ref, dw_ref, db_ref = ref.backward(np64(dy), cache)
        rm_ref, rv_ref, _ = ref.update_running_stats(rm_in, rv_in, cache.stats, momentum)
    else:
        y_ref = ref.forward_eval(np64(x), rm_in, rv_in, np64(w), np64(b), 1e-5)
        dx_ref, dw_ref, db_ref = ref.backward_eval(np64(dy), np64(x), rm_in, rv_in, np64(w), 1e-5)
        rm_ref, rv_ref = rm_in, rv_in
    big = max(1.0, abs(offset) / scale)
    assert_close(y, y_ref, atol=1e-9 * big, what="y")
    assert_close(x.grad, dx_ref, atol=1e-8 * big / min(scale, 1.0), rtol=1e-8, what="dx")
    assert_close(rm, rm_ref, atol=1e-10 * max(1, abs(offset)), what="running_mean")
    assert_close(rv, rv_ref, rtol=1e-9, atol=1e-12, what="running_var")
    if affine:
        assert_close(w.grad, dw_ref, atol=1e-8 * big, rtol=1e-8, what="dweight")
        assert_close(b.grad, db_ref, atol=1e-9, rtol=1e-9, what="dbias")


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 3), (2, 2, 2, 3)])
def test_gradcheck_and_gradgradcheck(training, affine, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w, b = _params(shape[1], affine=affine)
    rm, rv = (
        torch.randn(shape[1], dtype=torch.float64),
        torch.rand(shape[1], dtype=torch.float64) + 0.5,
    )
    inputs = (x, w, b) if affine else (x,)

    def fn(x, w=None, b=None):
        # running stats are passed as None in training so repeated calls stay identical
        return batch_norm(
            x, None if training else rm, None if training else rv, w, b, training=training, eps=1e-3
        )

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradcheck_channels_last():
    x = channels_last(torch.randn(3, 2, 2, 3, dtype=torch.float64)).requires_grad_()
    w, b = _params(2)
    assert torch.autograd.gradcheck(
        lambda *a: batch_norm(a[0], None, None, a[1], a[2], True), (x, w, b)
    )


# --- against torch, fp32 --------------------------------------------------------------------


@pytest.mark.parametrize("layout,cl", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_fp32(layout, cl, training):
    shape = SHAPES[layout]
    c = shape[1]
    base = torch.randn(shape) * 2 + 0.5
    base = channels_last(base) if cl else base
    outs = []
    for fn in (F.batch_norm, batch_norm):
        x = base.clone().requires_grad_()
        w, b = _params(c, dtype=torch.float32)
        torch.manual_seed(1)
        w.data.uniform_(0.5, 1.5)
        b.data.normal_()
        rm, rv = torch.full((c,), 0.3), torch.full((c,), 2.0)
        y = fn(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-5)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        outs.append((y, x.grad, w.grad, b.grad, rm, rv))
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
    for name, mine, theirs in zip(names, outs[1], outs[0], strict=True):
        assert_close(mine, theirs, atol=2e-5, rtol=1e-5, what=name)
    assert outs[1][0].stride() == outs[0][0].stride()


def test_non_contiguous_input_gives_torch_layout():
    x = torch.randn(4, 3, 5, 6).transpose(2, 3)
    y = batch_norm(x, None, None, training=True)
    expected = F.batch_norm(x, None, None, training=True)
    assert_close(y, expected, atol=1e-5)
    assert y.stride() == expected.stride()


# --- better than torch ----------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_precision_far_from_zero(offset):
    """fp32 data whose mean is `offset` standard deviations: within 1e-4 of exact."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, 8, 16, 16, generator=g, dtype=torch.float64) + offset).float()
    exact = exact_normalize(x)
    y = batch_norm(x, None, None, training=True)
    assert np.abs(np64(y) - exact).max() <= 1e-4
    # The data is hard: normalizing with the fp32 mean in one subtraction misses by more.
    naive = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    if offset >= 1e4:
        assert np.abs(np64(naive) - exact).max() > 1e-4


def test_precision_in_eval_with_running_statistics_far_from_zero():
    x = (torch.randn(64, 4, dtype=torch.float64) + 1e5).float()
    mean = x.double().mean(0)
    var = x.double().var(0, unbiased=False)
    y = batch_norm(x, mean.float(), var.float(), training=False)
    exact = (np64(x) - np64(mean.float())) / np.sqrt(np64(var.float()) + 1e-5)
    assert np.abs(np64(y) - exact).max() <= 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_batch_leaves_running_stats(bad):
    x = torch.randn(8, 3)
    x[2, 1] = bad
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.warns(NonFiniteBatchWarning, match=r"batch_norm: .*NaN or Inf"):
        y = batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert not torch.isfinite(y[:, 1]).all()  # the output shows the bad value, as torch's does
    with pytest.raises(NonFiniteBatchError):
        batch_norm(x, rm, rv, training=True, on_nonfinite="raise")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_finite_batch_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm(torch.randn(8, 3), torch.zeros(3), torch.ones(3), training=True)


# --- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_with_float32_parameters(dtype, training):
    x32 = torch.randn(8, 3, 4, 4) * 2 + 1
    x = x32.to(dtype).requires_grad_()
    w, b = _params(3, dtype=torch.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, w, b, training=training)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert w.grad.dtype == torch.float32 and rm.dtype == torch.float32
    expected = F.batch_norm(
        x.detach().float(), torch.zeros(3), torch.ones(3), w.detach(), b.detach(), training
    )
    assert_close(y, expected, atol=0.05, rtol=0.02)
    if training:  # statistics of the very values given, in float32 or better
        assert_close(rm, 0.1 * np64(x).mean(axis=(0, 2, 3)), atol=1e-6)


def test_dtype_errors():
    x = torch.randn(4, 3)
    with pytest.raises(BatchNormDtypeError, match=r"floating-point input, got torch\.int64"):
        batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)
    with pytest.raises(
        BatchNormDtypeError,
        match=r"torch\.float64 cannot be served by weight of dtype torch\.float32",
    ):
        batch_norm(x.double(), None, None, torch.ones(3), None, training=True)
    with pytest.raises(RuntimeError):  # also catchable as torch's error class
        batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3), training=True)
    with pytest.raises(BatchNormDtypeError):
        batch_norm(x.half(), torch.zeros(3, dtype=torch.bfloat16), torch.ones(3), training=True)


def test_shape_and_mode_errors():
    with pytest.raises(BatchNormShapeError, match="running_mean should contain 4 elements not 3"):
        batch_norm(torch.randn(5, 4), torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm(torch.randn(1, 4), None, None, training=True)
    with pytest.raises(ValueError, match="running_mean must be defined in evaluation mode"):
        batch_norm(torch.randn(5, 4), None, None, training=False)
    with pytest.raises(ValueError, match="eps must be positive"):
        batch_norm(torch.randn(5, 4), None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        batch_norm(torch.randn(5, 4), torch.zeros(4), torch.ones(4), training=False, eps=-1.0)
    with pytest.raises(BatchNormShapeError, match="at least 2 dims"):
        batch_norm(torch.randn(5), torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="on_nonfinite"):
        batch_norm(torch.randn(5, 4), None, None, training=True, on_nonfinite="ignore")


def test_empty_batch():
    rm, rv = torch.randn(5), torch.rand(5)
    rm0, rv0 = rm.clone(), rv.clone()
    x = torch.randn(0, 5, 3, requires_grad=True)
    w, b = _params(5, dtype=torch.float32)
    y = batch_norm(x, rm, rv, w, b, training=True)
    y.sum().backward()
    assert y.shape == (0, 5, 3)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.equal(w.grad, torch.zeros(5)) and torch.equal(b.grad, torch.zeros(5))
    assert batch_norm(torch.randn(0), None, None, training=True).shape == (0,)


def test_no_grad_path_equals_autograd_path():
    x = torch.randn(6, 3, 4)
    w, b = _params(3, dtype=torch.float32)
    with torch.no_grad():
        y0 = batch_norm(x, None, None, w, b, training=True)
    y1 = batch_norm(x.requires_grad_(), None, None, w, b, training=True)
    assert torch.equal(y0, y1.detach())


def test_dispatches_tensor_subclasses_like_torch():
    calls = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(4, 3).as_subclass(Logged)
    batch_norm(x, None, None, training=True)
    assert calls and calls[0] is batch_norm


def test_public_function_is_exported():
    assert bnorm.functional.batch_norm is batch_norm
