"""The NumPy oracle of the remedies, checked against independent computations."""

import numpy as np
import pytest
import torch

from bnorm import reference as ref
from bnorm import reference_remedies as rr

RNG = np.random.default_rng(0)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def test_renorm_without_clipping_room_is_batch_norm():
    x = RNG.normal(2.0, 3.0, size=(6, 3, 2))
    g, b = RNG.uniform(0.5, 1.5, 3), RNG.normal(size=3)
    y, cache = rr.renorm_forward_train(x, RNG.normal(size=3), RNG.uniform(1, 2, 3), g, b, 1.0, 0.0)
    y_bn, bn_cache = ref.forward_train(x, g, b)
    np.testing.assert_allclose(y, y_bn, rtol=1e-13, atol=1e-13)
    dy = RNG.normal(size=x.shape)
    for a, e in zip(rr.renorm_backward(dy, cache), ref.backward(dy, bn_cache), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_renorm_backward_is_autograd_with_r_and_d_detached():
    x = RNG.normal(1.0, 2.0, size=(5, 3))
    rm, rv = RNG.normal(size=3), RNG.uniform(0.2, 3.0, 3)
    g, b = RNG.uniform(0.5, 1.5, 3), RNG.normal(size=3)
    y, cache = rr.renorm_forward_train(x, rm, rv, g, b, r_max=1.5, d_max=0.5)
    xt, gt, bt = (torch.tensor(v, requires_grad=True) for v in (x, g, b))
    var, mu = torch.var_mean(xt, 0, correction=0)
    sigma_b = torch.sqrt(var + 1e-5)
    sigma = torch.sqrt(torch.tensor(rv) + 1e-5)
    r = torch.clamp(sigma_b / sigma, 1 / 1.5, 1.5).detach()
    d = torch.clamp((mu - torch.tensor(rm)) / sigma, -0.5, 0.5).detach()
    yt = gt * ((xt - mu) / sigma_b * r + d) + bt
    dy = RNG.normal(size=x.shape)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    for a, e in zip(rr.renorm_backward(dy, cache), (xt.grad, gt.grad, bt.grad), strict=True):
        np.testing.assert_allclose(a, e.numpy(), rtol=1e-10, atol=1e-12)


def test_ghost_with_one_chunk_is_batch_norm_and_chunks_are_independent():
    x = RNG.normal(size=(7, 2, 3))
    y, stats = rr.ghost_forward_train(x, 7)
    np.testing.assert_allclose(y, ref.forward_train(x)[0], rtol=1e-13, atol=1e-13)
    y, stats = rr.ghost_forward_train(x, 3)
    assert [s.count for s in stats] == [9, 9, 3]
    np.testing.assert_allclose(y[6:], ref.forward_train(x[6:])[0], rtol=1e-13, atol=1e-13)
    rm, rv, t = rr.ghost_running_update(np.zeros(2), np.ones(2), stats, momentum=1.0)
    np.testing.assert_allclose(rm, np.mean([s.mean for s in stats], axis=0))
    np.testing.assert_allclose(rv, np.mean([s.var * s.count / (s.count - 1) for s in stats], 0))
    assert t == 1


@pytest.mark.parametrize("act", ["leaky_relu", "elu", "identity"])
def test_activation_inverse_and_bn_act_backward(act):
    z = np.linspace(-4, 4, 41)
    y = rr.act_forward(z, act, 0.1, 0.7)
    back, slope = rr.act_inverse(y, act, 0.1, 0.7)
    np.testing.assert_allclose(back, z, rtol=1e-12, atol=1e-12)
    h = 1e-6
    numeric = (rr.act_forward(z + h, act, 0.1, 0.7) - rr.act_forward(z - h, act, 0.1, 0.7)) / 2 / h
    keep = np.abs(z) > 1e-3  # away from the kink
    np.testing.assert_allclose(slope[keep], numeric[keep], rtol=1e-6)
    x = RNG.normal(size=(6, 3, 2))
    g, b = np.array([0.7, -1.2, 1.5]), RNG.normal(size=3)
    y, cache = rr.bn_act_forward(x, g, b, act, negative_slope=0.1, alpha=0.7)
    dy = RNG.normal(size=x.shape)
    got = rr.bn_act_backward(dy, y, g, b, cache.invstd, act, 0.1, 0.7)
    # the plain chain rule: activation derivative from z, then batch norm's backward
    z_full = ref.forward_train(x, g, b)[0]
    _, slope_z = rr.act_inverse(rr.act_forward(z_full, act, 0.1, 0.7), act, 0.1, 0.7)
    expected = ref.backward(dy * slope_z, cache)
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="cannot be inverted"):
        rr.act_inverse(y, "relu")


def test_bnlstm_with_one_step_is_an_lstm_step_on_normalized_terms():
    x = RNG.normal(size=(1, 4, 2))
    w_ih, w_hh = RNG.normal(size=(12, 2)), RNG.normal(size=(12, 3))
    bias = RNG.normal(size=12)
    gammas = (np.full(12, 0.1), np.full(12, 0.1), np.full(3, 0.1))
    running = {k: {"mean": np.zeros((2, n)), "var": np.ones((2, n))} for k, n in
               (("x", 12), ("h", 12), ("c", 3))}  # fmt: skip
    out, h, c = rr.bnlstm_forward(
        x, np.array([1, 1, 1, 1]), w_ih, w_hh, bias, gammas, np.zeros(3), 2, running
    )
    # h_0 = 0: the hidden term is constant, normalizes to 0; c_0 = 0
    gates = ref.forward_train(x[0] @ w_ih.T, gammas[0], None)[0] + bias
    i, _forget, g, o = np.split(gates, 4, axis=1)  # c_0 = 0: the forget gate has no effect
    c_exp = _sigmoid(i) * np.tanh(g)
    h_exp = _sigmoid(o) * np.tanh(ref.forward_train(c_exp, gammas[2], None)[0])
    np.testing.assert_allclose(c, c_exp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h, h_exp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out[0], h_exp, rtol=1e-12, atol=1e-12)
