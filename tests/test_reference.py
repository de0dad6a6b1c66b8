"""The NumPy reference against finite differences and against its own definitions."""

import numpy as np
import pytest

from bnorm import reference as ref


def _numeric_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every element of a (in place)."""
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize(
    "shape,axis",
    [((5, 3), 1), ((4, 3, 2), 1), ((2, 3, 2, 2), 1), ((2, 2, 2, 3), -1), ((3, 2, 4), 0)],
)
def test_backward_matches_finite_differences(shape, axis):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.5, shape)
    c = shape[axis]
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    r = rng.normal(size=shape)  # L = sum(y * r), so dL/dy = r

    def loss():
        y, _ = ref.forward_train(x, gamma, beta, eps=1e-3, axis=axis)
        return float((y * r).sum())

    _, cache = ref.forward_train(x, gamma, beta, eps=1e-3, axis=axis)
    dx, dgamma, dbeta = ref.backward(r, cache)
    np.testing.assert_allclose(dx, _numeric_grad(loss, x), atol=1e-6)
    np.testing.assert_allclose(dgamma, _numeric_grad(loss, gamma), atol=1e-6)
    np.testing.assert_allclose(dbeta, _numeric_grad(loss, beta), atol=1e-6)


def test_backward_eval_matches_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 5))
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    r = rng.normal(size=x.shape)

    def loss():
        return float((ref.forward_eval(x, rm, rv, gamma, beta, eps=1e-3) * r).sum())

    dx, dgamma, dbeta = ref.backward_eval(r, x, rm, rv, gamma, eps=1e-3)
    np.testing.assert_allclose(dx, _numeric_grad(loss, x), atol=1e-6)
    np.testing.assert_allclose(dgamma, _numeric_grad(loss, gamma), atol=1e-6)
    np.testing.assert_allclose(dbeta, _numeric_grad(loss, beta), atol=1e-6)


def test_forward_normalizes_each_channel():
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 3.0, (64, 4, 3))
    y, cache = ref.forward_train(x, eps=1e-5)
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0, atol=1e-12)
    # var(y) = var / (var + eps), slightly below 1
    expected_var = cache.stats.var / (cache.stats.var + 1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 2)), expected_var, rtol=1e-12)
    assert cache.stats.count == 64 * 3


def test_channels_last_axis_equals_channels_first():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 4, 5))
    y1, _ = ref.forward_train(x, axis=1)
    y2, _ = ref.forward_train(np.moveaxis(x, 1, -1), axis=-1)
    np.testing.assert_allclose(np.moveaxis(y2, -1, 1), y1, atol=1e-14)


def test_eval_with_the_batch_statistics_equals_train():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 3))
    y, cache = ref.forward_train(x, eps=1e-4)
    np.testing.assert_allclose(
        ref.forward_eval(x, cache.stats.mean, cache.stats.var, eps=1e-4), y, atol=1e-14
    )


def test_running_update_follows_pytorch_convention():
    rng = np.random.default_rng(6)
    x = rng.normal(3.0, 2.0, (10, 2))
    stats = ref.batch_stats(x)
    rm, rv, t = ref.update_running_stats(np.zeros(2), np.ones(2), stats, momentum=0.1)
    np.testing.assert_allclose(rm, 0.1 * x.mean(axis=0))
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x.var(axis=0, ddof=1))  # unbiased
    assert t == 1


def test_momentum_none_is_the_cumulative_average():
    rng = np.random.default_rng(7)
    batches = [rng.normal(i, 1.0 + i, (6, 3)) for i in range(4)]
    rm, rv, t = np.full(3, 123.0), np.full(3, 456.0), 0
    for b in batches:
        rm, rv, t = ref.update_running_stats(rm, rv, ref.batch_stats(b), None, t)
    np.testing.assert_allclose(rm, np.mean([b.mean(axis=0) for b in batches], axis=0))
    np.testing.assert_allclose(rv, np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0))
    assert t == 4


def test_empty_batch_keeps_statistics_and_counts():
    stats = ref.batch_stats(np.zeros((0, 3)))
    rm, rv, t = ref.update_running_stats(np.ones(3), np.full(3, 2.0), stats, 0.5, 7)
    np.testing.assert_array_equal(rm, 1.0)
    np.testing.assert_array_equal(rv, 2.0)
    assert t == 8


def test_update_refuses_one_value_per_channel():
    with pytest.raises(ValueError, match="one value per channel"):
        ref.update_running_stats(np.zeros(2), np.ones(2), ref.batch_stats(np.ones((1, 2))))


def test_merge_stats_is_exact():
    rng = np.random.default_rng(8)
    parts = [rng.normal(100.0 * i, 1.0 + i, (n, 3)) for i, n in enumerate((5, 1, 17))]
    merged = ref.merge_stats([ref.batch_stats(p) for p in parts])
    whole = ref.batch_stats(np.concatenate(parts))
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.var, whole.var, rtol=1e-12)
    assert merged.count == 23


def test_merge_stats_skips_empty_and_refuses_nothing():
    a = ref.batch_stats(np.arange(6.0).reshape(3, 2))
    empty = ref.batch_stats(np.zeros((0, 2)))
    merged = ref.merge_stats([empty, a])
    np.testing.assert_allclose(merged.var, a.var)
    with pytest.raises(ValueError):
        ref.merge_stats([empty])


def test_keras_momentum():
    assert ref.keras_momentum(0.99) == pytest.approx(0.01)
    assert ref.keras_momentum(0.9) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        ref.keras_momentum(1.5)


def test_rank_one_is_refused():
    with pytest.raises(ValueError, match="rank"):
        ref.forward_train(np.ones(4))
