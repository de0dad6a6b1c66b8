"""bnorm.BatchRenorm1d/2d/3d against the NumPy reference, torch's BatchNorm, and its schedules."""

import numpy as np
import pytest
import torch
from helpers import assert_close, channels_last, np64
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnorm
from bnorm import reference as ref
from bnorm import reference_remedies as rr
from bnorm.modules.renorm import PAPER_D_MAX, PAPER_R_MAX

_TORCH_JIT_DEPRECATED = r"ignore:.*torch\.jit.* is deprecated:DeprecationWarning"  # torch's

LAYERS = [
    (bnorm.BatchRenorm1d, nn.BatchNorm1d, (7, 4)),
    (bnorm.BatchRenorm1d, nn.BatchNorm1d, (3, 4, 5)),
    (bnorm.BatchRenorm2d, nn.BatchNorm2d, (3, 4, 3, 2)),
    (bnorm.BatchRenorm3d, nn.BatchNorm3d, (2, 4, 2, 3, 2)),
]


def _layer(cls, c, **kw):
    m = cls(c, dtype=torch.float64, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        # running statistics far enough from the batch's that r and d clip in some channels
        m.running_mean.copy_(torch.linspace(-3, 3, c, dtype=torch.float64))
        m.running_var.copy_(torch.linspace(0.05, 20, c, dtype=torch.float64))
    return m


def _check_against_reference(m, x, r_max, d_max):
    rm, rv = np64(m.running_mean), np64(m.running_var)
    g, b = np64(m.weight), np64(m.bias)
    xi = x.clone().requires_grad_()
    y = m(xi)
    dy = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view(y.shape)
    y.backward(dy)
    y_ref, cache = rr.renorm_forward_train(np64(x), rm, rv, g, b, r_max, d_max, m.eps)
    dx, dg, db = rr.renorm_backward(np64(dy), cache)
    assert_close(y, y_ref, atol=1e-12, rtol=1e-10, what="y")
    assert_close(xi.grad, dx, atol=1e-12, rtol=1e-10, what="dx")
    assert_close(m.weight.grad, dg, atol=1e-12, rtol=1e-10, what="dweight")
    assert_close(m.bias.grad, db, atol=1e-12, rtol=1e-10, what="dbias")
    new_rm, new_rv, _ = ref.update_running_stats(rm, rv, cache.bn.stats, momentum=m.momentum)
    assert_close(m.running_mean, new_rm, atol=1e-12, rtol=1e-12, what="running_mean")
    assert_close(m.running_var, new_rv, atol=1e-12, rtol=1e-12, what="running_var")
    return cache


@pytest.mark.parametrize("cls,_t,shape", LAYERS)
def test_training_matches_reference_float64(cls, _t, shape):
    m = _layer(cls, shape[1], r_max=1.5, d_max=0.5)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    cache = _check_against_reference(m, x, 1.5, 0.5)
    # the data really exercises the clipping, else this test would not see r and d at all
    assert np.any(cache.r == 1.5) and np.any(cache.r == 1 / 1.5) and np.any(np.abs(cache.d) == 0.5)
    assert int(m.num_batches_tracked) == 1


def test_channels_last_matches_reference():
    m = _layer(bnorm.BatchRenorm2d, 4, r_max=2.0, d_max=1.0)
    x = channels_last(torch.randn(3, 4, 3, 5, dtype=torch.float64) + 2)
    _check_against_reference(m, x, 2.0, 1.0)


@pytest.mark.parametrize("cls,torch_cls,shape", LAYERS)
def test_r_max_1_d_max_0_is_batch_norm(cls, torch_cls, shape):
    ours = cls(shape[1], r_max=1.0, d_max=0.0)
    plain = getattr(bnorm, torch_cls.__name__)(shape[1])
    theirs = torch_cls(shape[1])
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    plain.load_state_dict(ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        x = torch.randn(shape) * (1 + step) + step
        outs = []
        for m in (ours, plain, theirs):
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y * torch.arange(y.numel()).view(y.shape).sin()).sum().backward()
            outs.append((y.detach(), xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
            m.zero_grad()
        for a, b in zip(outs[0], outs[1], strict=True):
            assert torch.equal(a, b)  # the same kernels with r = 1, d = 0: bit for bit
        for a, b in zip(outs[0], outs[2], strict=True):
            assert_close(a, b, atol=2e-5, rtol=1e-5)
    for k, v in ours.state_dict().items():
        assert_close(v.double(), theirs.state_dict()[k].double(), atol=1e-6, rtol=1e-6, what=k)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape)
    assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


# forward-mode AD loads torch's decompositions, which call the deprecated torch.jit.script
@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATED)
def test_gradcheck():
    from bnorm.modules.renorm import batch_renorm

    # Running statistics far from the batch's, so r and d sit at their clipping limits in every
    # channel: there they are truly constant in x, and the finite differences gradcheck takes
    # agree with the backward that holds them constant. (Elsewhere the reference tests apply.)
    rm = torch.tensor([2.0, -2.0, 2.0], dtype=torch.float64)
    rv = torch.tensor([0.1, 4.0, 0.1], dtype=torch.float64)

    def f(x, w, b):
        # fresh copies: the same running statistics, hence the same r and d, at every call
        return batch_renorm(
            x, rm.clone(), rv.clone(), w, b, r_max=1.2, d_max=0.3, momentum=0.1, eps=1e-5
        )

    x = torch.randn(5, 3, 2, dtype=torch.float64).requires_grad_()
    w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_batched_grad=True)


def _renorm_fixed_r_d(x, w, b, r, d, eps):
    """Renorm with r and d given: float64 aten ops, the paper's derivative by autograd."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    xhat = (x - mean) * torch.rsqrt(var + eps)
    return w.view(shape) * (xhat * r.view(shape) + d.view(shape)) + b.view(shape)


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATED)
def test_derivatives_of_every_order_hold_r_and_d_constant():
    """Where r and d are not clipped they depend on x, and the paper's derivative ignores
    that: forward-mode tangents, first and second reverse derivatives all equal those of the
    same function with r and d given as constants."""
    from torch.autograd import forward_ad as fwAD

    from bnorm.modules.renorm import batch_renorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3, 4, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.rand(3, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    rm = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    rv = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():  # r and d of this batch, inside the limits (not clipped)
        var, mean = torch.var_mean(x, [0, 2], correction=0)
        r, d = torch.sqrt(var + eps) / torch.sqrt(rv + eps), (mean - rm) / torch.sqrt(rv + eps)
    assert bool((r > 1 / 3).all() and (r < 3).all() and (d.abs() < 5).all())

    def ours(x_, w_, b_):
        return batch_renorm(
            x_, rm.clone(), rv.clone(), w_, b_, r_max=3.0, d_max=5.0, momentum=0.1, eps=eps
        )

    def fixed(x_, w_, b_):
        return _renorm_fixed_r_d(x_, w_, b_, r, d, eps)

    tx, tw, tb = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b))
    tangents = []
    for f in (ours, fixed):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p.detach(), t) for p, t in ((x, tx), (w, tw), (b, tb))]
            tangents.append(fwAD.unpack_dual(f(*duals)).tangent)
    assert_close(tangents[0], tangents[1], atol=1e-12, rtol=1e-10, what="forward-mode tangent")

    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for f in (ours, fixed):
        first = torch.autograd.grad(f(x, w, b), (x, w, b), v, create_graph=True)
        # a second derivative: of <first, tangents> with respect to x, w and b
        inner = sum((gr * t).sum() for gr, t in zip(first, (tx, tw, tb), strict=True))
        second = torch.autograd.grad(inner, (x, w, b), allow_unused=True, materialize_grads=True)
        results.append([t.detach() for t in (*first, *second)])
    for a, e, what in zip(*results, ["dx", "dw", "db", "ddx", "ddw", "ddb"], strict=True):
        assert_close(a, e, atol=1e-11, rtol=1e-9, what=what)


def test_eval_is_batch_norm_eval():
    m = _layer(bnorm.BatchRenorm2d, 4)
    m.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = ref.forward_eval(
        np64(x), np64(m.running_mean), np64(m.running_var), np64(m.weight), np64(m.bias)
    )
    assert_close(m(x), expected, atol=1e-12, rtol=1e-12)
    assert int(m.num_batches_tracked) == 0


def test_paper_schedule_and_resume_from_checkpoint():
    assert (PAPER_R_MAX(0), PAPER_D_MAX(0)) == (1.0, 0.0)
    assert (PAPER_R_MAX(5000), PAPER_D_MAX(5000)) == (1.0, 0.0)
    assert PAPER_R_MAX(22_500) == pytest.approx(2.0)
    assert PAPER_D_MAX(15_000) == pytest.approx(2.5)
    assert (PAPER_R_MAX(10**6), PAPER_D_MAX(10**6)) == (3.0, 5.0)
    m = bnorm.BatchRenorm1d(3, r_max="paper", d_max="paper")
    assert m.limits() == (1.0, 0.0)
    assert "r_max='paper'" in repr(m)
    saved = m.state_dict()
    saved["num_batches_tracked"] = torch.tensor(22_500)
    fresh = bnorm.BatchRenorm1d(3, r_max="paper", d_max="paper")
    fresh.load_state_dict(saved)
    assert fresh.limits() == pytest.approx((2.0, 4.375))
    fresh(torch.randn(4, 3))
    assert int(fresh.num_batches_tracked) == 22_501


def test_callable_schedule_uses_the_step():
    seen = []

    def r_sched(step):
        seen.append(step)
        return 1.0 + step

    m = bnorm.BatchRenorm1d(2, r_max=r_sched, d_max=bnorm.linear_ramp(0.0, 1.0, 0, 10))
    for _ in range(3):
        m(torch.randn(4, 2))
    assert seen == [0, 1, 2]
    assert m.limits(5) == (6.0, 0.5)


def test_bad_arguments_and_inputs_leave_state_unchanged():
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(3\): r_max must be >= 1"):
        bnorm.BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(3\): d_max must be >= 0"):
        bnorm.BatchRenorm2d(3, d_max=-1)
    with pytest.raises(ValueError, match="track_running_stats=False is not supported"):
        bnorm.BatchRenorm1d(3, track_running_stats=False)
    assert bnorm.BatchRenorm1d(3, track_running_stats=True).track_running_stats
    with pytest.raises(ValueError, match="unknown r_max schedule 'fast'"):
        bnorm.BatchRenorm2d(3, r_max="fast")
    m = bnorm.BatchRenorm2d(3, r_max=lambda step: 0.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(3\): r_max must be >= 1, got 0.0"):
        m(torch.randn(2, 3, 2, 2))
    with pytest.raises(bnorm.errors.BatchNormShapeError, match=r"BatchRenorm2d\(3\)"):
        bnorm.BatchRenorm2d(3)(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(3\): Expected more than 1 value"):
        m(torch.randn(1, 3, 1, 1))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_interchanges_with_torch():
    m = bnorm.BatchRenorm3d(5)
    t = nn.BatchNorm3d(5)
    t(torch.randn(2, 5, 2, 2, 2) + 3)
    m.load_state_dict(t.state_dict())
    assert list(m.state_dict()) == list(t.state_dict())
    t.load_state_dict(m.state_dict())
    assert isinstance(m, nn.BatchNorm3d)


@given(
    n=st.integers(2, 6),
    c=st.integers(1, 3),
    length=st.integers(1, 4),
    offset=st.sampled_from([0.0, 5.0, -100.0]),
    momentum=st.sampled_from([0.1, None, 0.9]),
    r_max=st.floats(1.0, 4.0),
    d_max=st.floats(0.0, 3.0),
)
def test_hypothesis_against_reference(n, c, length, offset, momentum, r_max, d_max):
    m = _layer(bnorm.BatchRenorm1d, c, r_max=r_max, d_max=d_max, momentum=momentum)
    m.weight.grad = m.bias.grad = None
    x = torch.randn(n, c, length, dtype=torch.float64) * 3 + offset
    if momentum is None:
        rm, rv = np64(m.running_mean), np64(m.running_var)
        stats = ref.batch_stats(np64(x), axis=1)
        m(x)
        expected = ref.update_running_stats(rm, rv, stats, momentum=None)
        assert_close(m.running_mean, expected[0], atol=1e-10, rtol=1e-10)
    else:
        _check_against_reference(m, x, r_max, d_max)
