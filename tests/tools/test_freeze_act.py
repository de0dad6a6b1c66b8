"""freeze/unfreeze and convert_sync_batchnorm on batch norm + activation layers: the activation
(and drop) are kept, and every layer left is reported."""

import pytest
import torch
from helpers import assert_close
from torch import nn

import bnorm


def _net(act="silu", dim=2):
    torch.manual_seed(0)
    if dim == 2:
        net = nn.Sequential(nn.Conv2d(3, 4, 1), bnorm.BatchNormAct2d(4, act_layer=act))
        x = torch.randn(6, 3, 4, 4)
    else:
        net = nn.Sequential(nn.Linear(3, 4), bnorm.BatchNormAct1d(4, act_layer=act))
        x = torch.randn(6, 3)
    with torch.no_grad():
        net(x * 2 + 1)  # running statistics away from their init
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-1, 1)
    return net, x


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("act", ["silu", "gelu", "hard_swish", "prelu", "identity"])
def test_freeze_keeps_the_activation_and_unfreeze_restores_the_layer(act, dim):
    net, x = _net(act, dim)
    layer = net[1]
    with torch.no_grad():
        expected = net.eval()(x)
    keys = list(net.state_dict())
    net, summary = bnorm.freeze(net, return_summary=True)
    frozen = net[1]
    target = bnorm.FrozenBatchNormAct2d if dim == 2 else bnorm.FrozenBatchNormAct1d
    assert type(frozen) is target and frozen.act is layer.act and frozen.drop is layer.drop
    assert summary.converted == {f"bnorm.BatchNormAct{dim}d -> bnorm.FrozenBatchNormAct{dim}d": 1}
    assert list(net.state_dict()) == keys
    net.train()
    with torch.no_grad():
        assert_close(net(x), expected, atol=0, rtol=0)
    assert not [p for p in frozen.parameters() if p is not None and p.numel() == 4]
    net, back = bnorm.unfreeze(net, return_summary=True)
    assert type(net[1]) is type(layer) and net[1].act is layer.act
    assert net[1].weight.requires_grad and net[1].training
    assert back.converted == {f"bnorm.FrozenBatchNormAct{dim}d -> bnorm.BatchNormAct{dim}d": 1}
    with torch.no_grad():
        assert_close(net.eval()(x), expected, atol=0, rtol=0)


def test_a_frozen_norm_act_made_directly_unfreezes_to_bnorms_layer():
    frozen = bnorm.FrozenBatchNormAct2d(3, act_layer="hard_sigmoid", dtype=torch.float64)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    expected = frozen(x)
    layer = bnorm.unfreeze(frozen)
    assert type(layer) is bnorm.BatchNormAct2d and type(layer.act) is nn.Hardsigmoid
    assert_close(layer.eval()(x), expected, atol=0, rtol=0)


def test_convert_sync_batchnorm_syncs_norm_act_and_reports_subclasses():
    class MyBN(nn.BatchNorm2d):
        pass

    net, x = _net("gelu")
    net.append(MyBN(4))
    net.append(bnorm.FrozenBatchNorm2d(4))  # nothing to synchronize: left without a warning
    with torch.no_grad():
        expected = net[1](net[0](x))
    with pytest.warns(bnorm.LayersLeftWarning, match=r"left 1 .*2 \(.*MyBN\): not plain"):
        net, summary = bnorm.convert_sync_batchnorm(net, return_summary=True)
    assert type(net[1]) is bnorm.SyncBatchNormAct and type(net[1].act) is nn.GELU
    assert summary.converted == {"bnorm.BatchNormAct2d -> bnorm.SyncBatchNormAct": 1}
    assert type(net[2]) is MyBN and type(net[3]) is bnorm.FrozenBatchNorm2d
    with torch.no_grad():  # not distributed: local batch norm, then the activation
        assert_close(net[1](net[0](x)), expected, atol=1e-6, rtol=1e-6)


def test_memory_efficient_norm_act_syncs_as_a_plain_one():
    layer = bnorm.BatchNormAct1d(3, act="elu", memory_efficient=True)
    synced = bnorm.convert_sync_batchnorm(layer)
    assert type(synced) is bnorm.SyncBatchNormAct and type(synced.act) is nn.ELU
    assert not hasattr(synced, "memory_efficient")
    x = torch.randn(5, 3)
    assert_close(synced(x), layer(x), atol=1e-6, rtol=1e-6)


def test_freeze_reports_sync_and_stateless_layers():
    net = nn.Sequential(bnorm.SyncBatchNorm(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.warns(bnorm.LayersLeftWarning, match="left 2") as w:
        _, summary = bnorm.freeze(net, return_summary=True)
    assert "0 (bnorm.SyncBatchNorm): no frozen layer of its kind" in str(w[0].message)
    assert [name for name, _, _ in summary.left] == ["0", "1"]
    assert summary.num_converted == 0
