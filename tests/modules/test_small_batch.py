"""Batch of one in training: torch's error (naming the remedies), or small_batch="running"."""

import pytest
import torch
from helpers import assert_close, np64
from torch import nn

import bnorm
from bnorm import reference as ref


def _trained(layer):
    layer(torch.randn(8, layer.num_features, dtype=layer.running_mean.dtype) * 3 + 2)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: bnorm.BatchNorm1d(3), (1, 3)),
        (lambda: bnorm.BatchNorm2d(3), (1, 3, 1, 1)),
        (lambda: bnorm.BatchRenorm1d(3), (1, 3)),
        (lambda: bnorm.GhostBatchNorm1d(3, 4), (1, 3)),
        (lambda: bnorm.BatchNormAct1d(3, "elu", memory_efficient=True), (1, 3)),
    ],
)
def test_default_raises_naming_the_remedies_and_changes_nothing(make, shape):
    layer = make()
    layer(torch.randn(4, *shape[1:]))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as info:
        layer(torch.randn(shape))
    for remedy in ("small_batch='running'", "bnorm.freeze", "layer.eval()", "GroupNorm"):
        assert remedy in str(info.value)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "make",
    [
        lambda: bnorm.BatchNorm1d(3, small_batch="running", dtype=torch.float64),
        lambda: bnorm.BatchRenorm1d(3, small_batch="running", dtype=torch.float64),
        lambda: bnorm.GhostBatchNorm1d(3, 2, small_batch="running", dtype=torch.float64),
        lambda: bnorm.BatchNormAct1d(
            3, "identity", memory_efficient=True, small_batch="running", dtype=torch.float64
        ),
    ],
)
def test_running_normalizes_with_running_statistics_and_skips_the_update(make):
    layer = _trained(make())
    assert layer.training
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    rm, rv, g = np64(layer.running_mean), np64(layer.running_var), np64(layer.weight)
    assert_close(y, ref.forward_eval(np64(x), rm, rv, g, np64(layer.bias)), atol=1e-12, rtol=1e-12)
    dy = torch.randn(1, 3, dtype=torch.float64)
    y.backward(dy)
    dx, dgamma, dbeta = ref.backward_eval(np64(dy), np64(x), rm, rv, g)
    assert_close(x.grad, dx, atol=1e-12, rtol=1e-12)
    assert_close(layer.weight.grad, dgamma, atol=1e-12, rtol=1e-12)
    assert_close(layer.bias.grad, dbeta, atol=1e-12, rtol=1e-12)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k  # statistics and num_batches_tracked unchanged
    layer(torch.randn(2, 3, dtype=torch.float64))  # a batch of two trains as usual
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_running_policy_limits_and_conversions():
    with pytest.raises(ValueError, match=r"small_batch must be one of \('error', 'running'\)"):
        bnorm.BatchNorm2d(3, small_batch="skip")
    stateless = bnorm.BatchNorm1d(3, track_running_stats=False, small_batch="running")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        stateless(torch.randn(1, 3))  # nothing to normalize with
    layer = bnorm.BatchNorm2d(3, small_batch="running")
    assert "small_batch='running'" in repr(layer)
    layer(torch.randn(1, 3, 2, 2))  # 4 values per channel: batch statistics, as usual
    assert int(layer.num_batches_tracked) == 1
    converted = bnorm.convert(nn.Sequential(nn.BatchNorm1d(3)))
    assert converted[0].small_batch == "error"
    converted[0].small_batch = "running"
    converted[0](torch.randn(1, 3))
    assert type(bnorm.convert(converted, to="torch")[0]) is nn.BatchNorm1d
    assert not hasattr(converted[0], "small_batch")


def test_functional_error_names_the_remedies():
    with pytest.raises(ValueError, match="small_batch='running'"):
        bnorm.functional.batch_norm(torch.randn(1, 3), None, None, training=True)
