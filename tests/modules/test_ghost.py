"""bnorm.GhostBatchNorm1d/2d against the NumPy reference and torch's BatchNorm."""

import numpy as np
import pytest
import torch
from helpers import assert_close, channels_last, is_channels_last, np64
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnorm
from bnorm import reference as ref
from bnorm import reference_remedies as rr


def _layer(cls, c, vbs, **kw):
    m = cls(c, vbs, dtype=torch.float64, **kw)
    if m.affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return m


def _reference_grads(x, dy, vbs, gamma):
    """Per-chunk batch-norm backward of the reference; γ and β sum over the chunks."""
    dxs, dg, db = [], 0.0, 0.0
    for s in range(0, x.shape[0], vbs):
        _, cache = ref.forward_train(x[s : s + vbs], gamma, None, 1e-5, axis=1)
        dx, g, b = ref.backward(dy[s : s + vbs], cache)
        dxs.append(dx)
        dg, db = dg + g, db + b
    return np.concatenate(dxs), dg, db


def _check(m, x):
    m.zero_grad(set_to_none=True)
    rm, rv, t = np64(m.running_mean), np64(m.running_var), int(m.num_batches_tracked)
    xi = x.clone().requires_grad_()
    y = m(xi)
    dy = torch.sin(torch.arange(y.numel(), dtype=torch.float64)).view(y.shape)
    y.backward(dy)
    y_ref, stats = rr.ghost_forward_train(
        np64(x), m.virtual_batch_size, np64(m.weight), np64(m.bias)
    )
    assert_close(y, y_ref, atol=1e-12, rtol=1e-10, what="y")
    dx, dg, db = _reference_grads(np64(x), np64(dy), m.virtual_batch_size, np64(m.weight))
    assert_close(xi.grad, dx, atol=1e-11, rtol=1e-9, what="dx")
    assert_close(m.weight.grad, dg, atol=1e-11, rtol=1e-9, what="dweight")
    assert_close(m.bias.grad, db, atol=1e-11, rtol=1e-9, what="dbias")
    new_rm, new_rv, new_t = rr.ghost_running_update(rm, rv, stats, m.momentum, t)
    assert_close(m.running_mean, new_rm, atol=1e-12, rtol=1e-12, what="running_mean")
    assert_close(m.running_var, new_rv, atol=1e-12, rtol=1e-12, what="running_var")
    assert int(m.num_batches_tracked) == new_t
    return y, stats


@pytest.mark.parametrize(
    "cls,shape,vbs",
    [
        (bnorm.GhostBatchNorm1d, (10, 3), 4),  # chunks 4, 4, 2
        (bnorm.GhostBatchNorm1d, (7, 3, 5), 3),  # chunks 3, 3, 1 (5 values per channel)
        (bnorm.GhostBatchNorm2d, (6, 3, 2, 3), 2),
    ],
)
def test_training_matches_reference_float64(cls, shape, vbs):
    m = _layer(cls, shape[1], vbs)
    x = torch.randn(shape, dtype=torch.float64) * 2 + torch.arange(shape[0]).view(
        -1, *[1] * (len(shape) - 1)
    )
    _, stats = _check(m, x)
    assert len(stats) == -(-shape[0] // vbs)
    # the chunks differ (their means follow the shifted samples): not plain batch norm
    assert not np.allclose(stats[0].mean, stats[-1].mean)


def test_channels_last_is_kept_and_matches_reference():
    m = _layer(bnorm.GhostBatchNorm2d, 3, 2)
    x = channels_last(torch.randn(5, 3, 2, 3, dtype=torch.float64))
    y, _ = _check(m, x)
    assert is_channels_last(y)


@pytest.mark.parametrize("vbs", [8, 100])
def test_large_virtual_batch_is_batch_norm(vbs):
    ours = bnorm.GhostBatchNorm2d(4, vbs)
    theirs = nn.BatchNorm2d(4)
    for _ in range(2):
        x = torch.randn(8, 4, 3, 3) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        ya.sum().backward()
        yb.sum().backward()
        assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    for k, v in ours.state_dict().items():
        assert_close(v.double(), theirs.state_dict()[k].double(), atol=1e-6, rtol=1e-6, what=k)


def test_gradcheck():
    m = _layer(bnorm.GhostBatchNorm1d, 2, 3)
    x = torch.randn(8, 2, 2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _with(m, w, b)(x), (x, m.weight, m.bias))


def _with(m, w, b):
    m.weight, m.bias = w, b
    return m


def test_eval_uses_running_statistics_and_momentum_none():
    m = _layer(bnorm.GhostBatchNorm1d, 3, 2, momentum=None)
    for _ in range(3):
        _check(m, torch.randn(6, 3, dtype=torch.float64) + 3)
    m.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = ref.forward_eval(
        np64(x), np64(m.running_mean), np64(m.running_var), np64(m.weight), np64(m.bias)
    )
    assert_close(m(x), expected, atol=1e-12, rtol=1e-12)


def test_without_running_stats_chunks_normalize_in_eval_too():
    m = _layer(bnorm.GhostBatchNorm1d, 3, 2, track_running_stats=False).eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    y_ref, _ = rr.ghost_forward_train(np64(x), 2, np64(m.weight), np64(m.bias))
    assert_close(m(x), y_ref, atol=1e-12, rtol=1e-10)


def test_single_value_virtual_batch_raises_before_any_change():
    m = bnorm.GhostBatchNorm1d(3, 4)
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(3\): .* batch of 9 cut into virtual"):
        m(torch.randn(9, 3))
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.running_mean, torch.zeros(3))
    with pytest.raises(ValueError, match="virtual_batch_size must be >= 1"):
        bnorm.GhostBatchNorm2d(3, 0)
    with pytest.raises(TypeError, match="virtual_batch_size must be an int"):
        bnorm.GhostBatchNorm2d(3, 2.5)
    assert "virtual_batch_size=4" in repr(m)


def test_state_dict_keys_are_batch_norms():
    m = bnorm.GhostBatchNorm2d(3, 4)
    assert list(m.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    m.load_state_dict(nn.BatchNorm2d(3).state_dict())


@given(
    n=st.integers(2, 12),
    vbs=st.integers(2, 6),
    c=st.integers(1, 3),
    offset=st.sampled_from([0.0, 1e3]),
    momentum=st.sampled_from([0.1, None]),
)
def test_hypothesis_against_reference(n, vbs, c, offset, momentum):
    m = _layer(bnorm.GhostBatchNorm1d, c, vbs, momentum=momentum)
    x = torch.randn(n, c, 2, dtype=torch.float64) + offset
    _check(m, x)
