"""bnorm.FrozenBatchNorm1d/2d/3d and bnorm.freeze/unfreeze: eval-mode batch norm, kept frozen."""

import copy

import pytest
import torch
from helpers import assert_close, np64
from torch import nn

import bnorm
from bnorm import reference as ref


def _trained(layer, shape):
    layer.train()
    for i in range(3):
        layer(torch.randn(shape, dtype=layer.running_mean.dtype) * (i + 2) + i)
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            if layer.bias is not None:
                layer.bias.uniform_(-1, 1)
    return layer


LAYERS = [
    (lambda: nn.BatchNorm1d(4), (6, 4)),
    (lambda: bnorm.BatchNorm1d(4, affine=False), (5, 4, 3)),
    (lambda: nn.BatchNorm2d(4, momentum=None), (3, 4, 2, 2)),
    (lambda: bnorm.BatchNorm2d(4, bias=False), (3, 4, 2, 2)),
    (lambda: bnorm.BatchRenorm2d(4, r_max=2.0), (3, 4, 2, 2)),
    (lambda: bnorm.GhostBatchNorm1d(4, 2), (6, 4)),
    (lambda: nn.BatchNorm3d(4), (2, 4, 2, 2, 2)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
def test_freeze_computes_what_eval_computed_and_unfreeze_restores(make, shape):
    layer = _trained(make(), shape)
    x = torch.randn(shape)
    expected = copy.deepcopy(layer).eval()(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    frozen = bnorm.freeze(layer)
    assert isinstance(frozen, bnorm.modules.frozen._FrozenBatchNormBase)
    frozen.train()  # stays frozen in training mode
    xi = x.clone().requires_grad_()
    y = frozen(xi)
    if type(layer).__module__.startswith("bnorm"):
        assert torch.equal(y, expected)  # the same computation, bit for bit
    else:
        assert_close(y, expected, atol=1e-6, rtol=1e-6)
    y.backward(torch.ones_like(y))
    assert list(frozen.parameters()) == []
    for k, v in frozen.state_dict().items():  # nothing moved, not even the counter
        if k in state:
            assert torch.equal(v, state[k]), k
    back = bnorm.unfreeze(frozen)
    assert type(back) is type(layer)
    assert back.training
    assert list(back.state_dict()) == list(state)
    for k, v in back.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert back.momentum == layer.momentum and back.affine == layer.affine
    assert repr(back) == repr(layer)
    assert [p.shape for p in back.parameters()] == [p.shape for p in layer.parameters()]
    back(torch.randn(shape))  # trains again: the running statistics move
    assert not torch.equal(back.running_mean, state["running_mean"])


def test_gradient_is_that_of_eval_batch_norm():
    bn = _trained(bnorm.BatchNorm1d(3, dtype=torch.float64), (5, 3))
    frozen = bnorm.freeze(copy.deepcopy(bn))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 3, dtype=torch.float64)
    frozen(x).backward(dy)
    rm, rv, g = np64(bn.running_mean), np64(bn.running_var), np64(bn.weight)
    dx, _, _ = ref.backward_eval(np64(dy), np64(x), rm, rv, g, bn.eps)
    assert_close(x.grad, dx, atol=1e-13, rtol=1e-12)
    assert_close(
        frozen(x), ref.forward_eval(np64(x), rm, rv, g, np64(bn.bias)), atol=1e-13, rtol=1e-12
    )
    assert torch.autograd.gradcheck(frozen, (x,))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), bnorm.BatchNorm1d(5))
        self.stateless = nn.BatchNorm1d(5, track_running_stats=False)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.stateless(self.head(self.features(x))))


def test_freeze_model_then_train_keeps_bn_frozen_and_round_trips():
    net = Net()
    net(torch.randn(8, 3, 4, 4))
    net.eval()
    x = torch.randn(6, 3, 4, 4)
    before = net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(bnorm.LayersLeftWarning, match=r"stateless \(torch.BatchNorm1d\): no "):
        assert bnorm.freeze(net) is net
    assert type(net.features[1]) is bnorm.FrozenBatchNorm2d
    assert type(net.head[2]) is bnorm.FrozenBatchNorm1d
    assert type(net.stateless) is nn.BatchNorm1d  # batch statistics cannot be frozen
    assert_close(net(x), before, atol=1e-6, rtol=1e-6)
    assert list(net.state_dict()) == list(state)  # checkpoints interchange
    net.train()
    net(torch.randn(6, 3, 4, 4))
    for k in ("features.1.running_mean", "head.2.running_var", "head.2.num_batches_tracked"):
        assert torch.equal(net.state_dict()[k], state[k])
    bnorm.unfreeze(net)
    assert type(net.features[1]) is nn.BatchNorm2d
    assert type(net.head[2]) is bnorm.BatchNorm1d
    assert net.features[1].training
    net.load_state_dict(state)


def test_frozen_layer_state_dict_and_errors():
    frozen = bnorm.FrozenBatchNorm2d(3)
    trained = _trained(nn.BatchNorm2d(3), (4, 3, 2, 2))
    frozen.load_state_dict(trained.state_dict())
    without_counter = {k: v for k, v in trained.state_dict().items() if k != "num_batches_tracked"}
    frozen.load_state_dict(without_counter)  # torchvision-style frozen checkpoints
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(frozen.state_dict())
    x = torch.randn(2, 3, 2, 2)
    assert_close(frozen(x), plain.eval()(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(bnorm.errors.BatchNormShapeError, match=r"FrozenBatchNorm2d\(3\)"):
        frozen(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\): expected 4D input"):
        frozen(torch.randn(2, 3))
    direct = bnorm.unfreeze(frozen)  # made directly: becomes bnorm's batch norm
    assert type(direct) is bnorm.BatchNorm2d
    assert_close(direct.eval()(x), plain(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match=r"freeze: expected a torch\.nn\.Module"):
        bnorm.freeze(3)
    frozen1 = bnorm.FrozenBatchNorm1d(2)
    assert frozen1(torch.randn(1, 2)).shape == (1, 2)  # a batch of one is fine: no statistics
