"""bnorm.BatchNormAct1d/2d: BN + activation, and the memory-efficient mode that keeps only y."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, channels_last, is_channels_last, np64
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnorm
from bnorm import reference_remedies as rr

INVERTIBLE = ["leaky_relu", "elu", "identity"]
TORCH_ACT = {
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "elu": F.elu,
    "identity": lambda z: z,
}


def _pair(cls, c, act, dtype=torch.float64, **kw):
    efficient = cls(c, act, memory_efficient=True, dtype=dtype, **kw)
    plain = cls(c, act, dtype=dtype, **kw)
    if efficient.affine:
        with torch.no_grad():
            efficient.weight.uniform_(0.5, 1.5)
            efficient.weight[0] *= -1  # a negative γ must work too
            efficient.bias.uniform_(-1, 1)
    plain.load_state_dict(efficient.state_dict())
    return efficient, plain


def _run(m, x, dy):
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = m(xi)
    y.backward(dy)
    return y.detach(), xi.grad, [p.grad for p in m.parameters()]


@pytest.mark.parametrize("act", INVERTIBLE)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "cls,shape,kw",
    [
        (bnorm.BatchNormAct1d, (6, 3), {}),
        (bnorm.BatchNormAct1d, (4, 3, 5), {"affine": False}),
        (bnorm.BatchNormAct2d, (3, 3, 4, 2), {"momentum": None}),
    ],
)
def test_memory_efficient_gradients_equal_plain(act, training, cls, shape, kw):
    efficient, plain = _pair(cls, shape[1], act, **kw)
    if not training:
        efficient.running_mean.uniform_(-1, 1)
        efficient.running_var.uniform_(0.5, 2)
        plain.load_state_dict(efficient.state_dict())
        efficient.eval()
        plain.eval()
    for step in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 2 + step
        dy = torch.randn(shape, dtype=torch.float64)
        y_e, dx_e, dp_e = _run(efficient, x, dy)
        y_p, dx_p, dp_p = _run(plain, x, dy)
        assert_close(y_e, y_p, atol=1e-14, rtol=1e-13, what="y")
        assert_close(dx_e, dx_p, atol=1e-12, rtol=1e-10, what="dx")
        for a, b in zip(dp_e, dp_p, strict=True):
            assert_close(a, b, atol=1e-12, rtol=1e-10, what="dparam")
    for k, v in efficient.state_dict().items():
        assert_close(v, plain.state_dict()[k], atol=1e-14, rtol=1e-13, what=k)


@pytest.mark.parametrize("act", INVERTIBLE)
def test_memory_efficient_matches_reference(act):
    m, _ = _pair(bnorm.BatchNormAct2d, 3, act)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64) + 1
    dy = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    y, dx, (dg, db) = _run(m, x, dy)
    g, b = np64(m.weight), np64(m.bias)
    y_ref, cache = rr.bn_act_forward(np64(x), g, b, act)
    assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    # the reference backward, too, sees only the output y
    dx_ref, dg_ref, db_ref = rr.bn_act_backward(np64(dy), y_ref, g, b, cache.invstd, act)
    assert_close(dx, dx_ref, atol=1e-12, rtol=1e-10)
    assert_close(dg, dg_ref, atol=1e-12, rtol=1e-10)
    assert_close(db, db_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("act", INVERTIBLE)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_memory_efficient(act, training):
    m, _ = _pair(bnorm.BatchNormAct1d, 2, act, momentum=0.0)
    m.train(training)
    x = torch.randn(5, 2, 2, dtype=torch.float64, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("act", ["relu", *INVERTIBLE])
def test_plain_matches_torch_batch_norm_and_activation(act):
    ours = bnorm.BatchNormAct2d(4, act)
    theirs = nn.BatchNorm2d(4)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = channels_last(torch.randn(3, 4, 3, 3))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), TORCH_ACT[act](theirs(xb))
    ya.backward(torch.ones_like(ya))
    yb.backward(torch.ones_like(yb))
    assert is_channels_last(ya)
    assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    assert_close(ours.running_var, theirs.running_var, atol=1e-6, rtol=1e-6)


def test_memory_efficient_keeps_only_its_output():
    m = bnorm.BatchNormAct2d(8, "leaky_relu", memory_efficient=True)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = x * 1  # a fresh input the layer alone would keep
        y = m(h)
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    assert big == {y.untyped_storage().data_ptr()}
    assert h.untyped_storage().data_ptr() not in big


def test_state_dict_is_batch_norms_and_checks():
    m = bnorm.BatchNormAct1d(3, "elu", memory_efficient=True)
    torch_bn = nn.BatchNorm1d(3)
    torch_bn(torch.randn(5, 3) + 2)
    m.load_state_dict(torch_bn.state_dict())
    assert list(m.state_dict()) == list(torch_bn.state_dict())
    torch_bn.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match=r"BatchNormAct2d\(3\): memory_efficient=True needs an "):
        bnorm.BatchNormAct2d(3, "relu", memory_efficient=True)
    try:
        bnorm.BatchNormAct2d(3, "relu", memory_efficient=True)
    except ValueError as e:  # the message names every way out
        for way in ("leaky_relu", "elu", "identity", "memory_efficient=False"):
            assert way in str(e)
    with pytest.raises(ValueError, match="act must be one of"):
        bnorm.BatchNormAct2d(3, act="no_such_activation")
    with pytest.raises(ValueError, match="negative_slope > 0"):
        bnorm.BatchNormAct2d(3, "leaky_relu", memory_efficient=True, negative_slope=0.0)
    with torch.no_grad():
        m.weight[1] = 0
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"weight must have no zero; channels \[1\]"):
        m(torch.randn(4, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        assert m(torch.randn(4, 3)).shape == (4, 3)  # inference needs no inversion
    assert "(act): ELU(alpha=1.0" in repr(m) and "memory_efficient=True" in repr(m)


def test_precise_bn_sees_its_input_and_freeze_keeps_the_activation():
    net = nn.Sequential(nn.Linear(2, 3), bnorm.BatchNormAct1d(3, "leaky_relu", True))
    data = [torch.randn(6, 2) + 3, torch.randn(4, 2)]
    bnorm.precise_bn(net, data)
    with torch.no_grad():
        inputs = torch.cat([net[0](d) for d in data])
    assert_close(net[1].running_mean, inputs.mean(0), atol=1e-5, rtol=1e-5)
    assert_close(net[1].running_var, inputs.var(0), atol=1e-5, rtol=1e-5)
    act = net[1].act
    x = torch.randn(5, 2)
    with torch.no_grad():
        expected = net.eval()(x)
    bnorm.freeze(net).train()
    assert type(net[1]) is bnorm.FrozenBatchNormAct1d and net[1].act is act
    with torch.no_grad():
        assert_close(net(x), expected, atol=0, rtol=0)  # frozen = evaluation, bit for bit


@given(
    act=st.sampled_from(INVERTIBLE),
    n=st.integers(2, 5),
    length=st.integers(1, 3),
    training=st.booleans(),
    slope=st.sampled_from([0.01, 0.2]),
)
def test_hypothesis_efficient_equals_plain(act, n, length, training, slope):
    efficient, plain = _pair(bnorm.BatchNormAct1d, 3, act, negative_slope=slope, alpha=0.7)
    efficient.train(training)
    plain.train(training)
    x = torch.randn(n, 3, length, dtype=torch.float64)
    dy = torch.randn(n, 3, length, dtype=torch.float64)
    y_e, dx_e, _ = _run(efficient, x, dy)
    y_p, dx_p, _ = _run(plain, x, dy)
    assert_close(y_e, y_p, atol=1e-13, rtol=1e-12)
    assert_close(dx_e, dx_p, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("act", INVERTIBLE)
@pytest.mark.parametrize("training", [True, False])
def test_overwrite_input_writes_the_output_into_the_input_and_keeps_the_gradients(act, training):
    efficient, plain = _pair(bnorm.BatchNormAct2d, 3, act)
    inplace = bnorm.BatchNormAct2d(3, act, True, overwrite_input=True, dtype=torch.float64)
    inplace.load_state_dict(efficient.state_dict())
    for m in (inplace, plain):
        m.train(training)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64) + 0.5
    dy = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    h = leaf * 1  # a non-leaf input, as a convolution's output is
    y = inplace(h)
    assert y.data_ptr() == h.data_ptr()  # the output lives in the input's memory
    y.backward(dy)
    y_p, dx_p, dp_p = _run(plain, x, dy)
    assert_close(y, y_p, atol=1e-14, rtol=1e-13)
    assert_close(leaf.grad, dx_p, atol=1e-12, rtol=1e-10)
    for a, b in zip([p.grad for p in inplace.parameters()], dp_p, strict=True):
        assert_close(a, b, atol=1e-12, rtol=1e-10)
    for k, v in inplace.state_dict().items():
        assert_close(v, plain.state_dict()[k], atol=1e-14, rtol=1e-13, what=k)


def test_overwrite_input_gradcheck_low_precision_and_errors():
    m = bnorm.BatchNormAct1d(
        2, act="elu", memory_efficient=True, overwrite_input=True, momentum=0.0, dtype=torch.float64
    )
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.7, -1.3], dtype=torch.float64))
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x * 1), (x,))
    with pytest.raises(ValueError, match="cannot be a leaf tensor that requires grad"):
        m(x)
    with pytest.raises(ValueError, match="overwrite_input=True is part of memory_efficient=True"):
        bnorm.BatchNormAct1d(2, "elu", overwrite_input=True)
    half = bnorm.BatchNormAct2d(3, "leaky_relu", True, overwrite_input=True)
    plain = bnorm.BatchNormAct2d(3, "leaky_relu")
    xb = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    assert_close(half(xb.clone()), plain(xb), atol=1e-2, rtol=1e-2)  # fp32 compute, bf16 out
