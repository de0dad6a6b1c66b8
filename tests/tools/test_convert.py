"""bnorm.convert: torch's batch-norm layers to bnorm's and back, state unchanged."""

import pytest
import torch
from helpers import assert_close
from torch import nn

import bnorm


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=None)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, affine=False)
        )
        self.other = nn.LayerNorm(5)

    def forward(self, x):
        return self.other(self.head(torch.relu(self.bn(self.conv(x)))))


def _trained_block():
    model = Block()
    model(torch.randn(8, 3, 6, 6) + 2)  # move the running statistics away from their init
    model.bn.weight.data.uniform_(0.5, 2)
    return model


def _bn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_round_trip_is_exact_and_keeps_the_tensors():
    model = _trained_block()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    weight = model.bn.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert bnorm.convert(model) is model
    assert _bn_types(model) == [bnorm.BatchNorm2d, bnorm.BatchNorm1d]
    assert model.bn.weight is weight  # same Parameter: the optimizer still updates it
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert type(model.other) is nn.LayerNorm

    x = torch.randn(4, 3, 6, 6)
    (model(x) * torch.randn(4, 5)).sum().backward()
    optimizer.step()
    assert not torch.equal(weight, state["bn.weight"])

    trained = {k: v.clone() for k, v in model.state_dict().items()}
    bnorm.convert(model, to="torch")
    assert _bn_types(model) == [nn.BatchNorm2d, nn.BatchNorm1d]
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k])
    assert not hasattr(model.bn, "on_nonfinite")


@pytest.mark.parametrize("training", [True, False])
def test_converted_model_computes_what_the_original_did(training):
    model = _trained_block().train(training)
    reference = _trained_block()
    reference.load_state_dict(model.state_dict())
    reference.train(training)
    bnorm.convert(model)
    x = torch.randn(4, 3, 6, 6)
    assert_close(model(x), reference(x), atol=1e-5)
    assert model.bn.training == training
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert_close(a.double(), b.double(), atol=1e-6)


def test_hooks_and_mode_travel_with_the_layer():
    bn = nn.BatchNorm1d(3).eval()
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    new = bnorm.convert(bn)
    assert type(new) is bnorm.BatchNorm1d and not new.training
    new(torch.randn(2, 3))
    assert seen == [bnorm.BatchNorm1d]
    assert bn.training is False and type(bn) is nn.BatchNorm1d  # the original is untouched


def test_converted_layer_does_not_share_containers_with_the_original():
    bn = nn.BatchNorm1d(3)
    new = bnorm.convert(bn)
    new.weight = nn.Parameter(torch.zeros(3))
    new.register_buffer("extra", torch.ones(1))
    assert torch.equal(bn.weight, torch.ones(3))
    assert "extra" not in dict(bn.named_buffers())


def test_subclasses_and_other_norms_are_left_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3), nn.GroupNorm(1, 3), nn.SyncBatchNorm(3))
    bnorm.convert(model)
    assert [type(m) for m in model] == [MyBN, nn.GroupNorm, nn.SyncBatchNorm]


def test_bad_arguments():
    with pytest.raises(ValueError, match="`to` must be 'bnorm' or 'torch', got 'keras'"):
        bnorm.convert(nn.BatchNorm1d(2), to="keras")
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        bnorm.convert([nn.BatchNorm1d(2)])
