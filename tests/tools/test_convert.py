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


def test_subclasses_and_other_norms_are_left_alone_with_a_warning_naming_them():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3), nn.GroupNorm(1, 3), nn.SyncBatchNorm(3), nn.BatchNorm2d(3))
    with pytest.warns(bnorm.LayersLeftWarning, match=r"left 2 .*0 \(.*MyBN\): a subclass") as w:
        _, summary = bnorm.convert(model, return_summary=True)
    assert "2 (torch.SyncBatchNorm): a SyncBatchNorm: bnorm.convert_sync_batchnorm" in str(
        w[0].message
    )
    assert [type(m) for m in model] == [MyBN, nn.GroupNorm, nn.SyncBatchNorm, bnorm.BatchNorm2d]
    assert summary.converted == {"torch.BatchNorm2d -> bnorm.BatchNorm2d": 1}
    assert [(name, why.split(":")[0]) for name, _, why in summary.left] == [
        ("0", "a subclass of torch's batch norm"),
        ("2", "a SyncBatchNorm"),
    ]


def test_summary_is_returned_logged_and_silent_when_nothing_is_left(caplog, recwarn):
    model = _trained_block()
    with caplog.at_level("INFO", logger="bnorm"):
        same = bnorm.convert(model)
    assert same is model  # the return value is unchanged without return_summary
    assert "convert to bnorm: 2 layer(s) changed, 0 left" in caplog.text
    assert "1 x torch.BatchNorm1d -> bnorm.BatchNorm1d" in caplog.text
    assert not recwarn.list
    _, back = bnorm.convert(model, to="torch", return_summary=True)
    assert back.converted == {
        "bnorm.BatchNorm2d -> torch.BatchNorm2d": 1,
        "bnorm.BatchNorm1d -> torch.BatchNorm1d": 1,
    }
    assert back.num_converted == 2 and "2 layer(s) changed" in str(back)


def test_to_torch_lists_bnorm_layers_without_a_torch_equivalent():
    model = nn.Sequential(bnorm.BatchRenorm1d(3), bnorm.BatchNorm1d(3))
    with pytest.warns(bnorm.LayersLeftWarning, match=r"0 \(bnorm.BatchRenorm1d\): no torch"):
        bnorm.convert(model, to="torch")
    assert [type(m) for m in model] == [bnorm.BatchRenorm1d, nn.BatchNorm1d]


def test_torchvisions_frozen_batch_norm_becomes_bnorms():
    from timm_shim import FrozenBatchNorm2d as TorchvisionFrozen  # torchvision's class and math

    frozen = TorchvisionFrozen(3)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(frozen, name).uniform_(-1, 1)
        frozen.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 4, 4)
    expected = frozen(x)
    model, summary = bnorm.convert(nn.Sequential(frozen), return_summary=True)
    assert type(model[0]) is bnorm.FrozenBatchNorm2d
    assert summary.converted == {"torchvision.FrozenBatchNorm2d -> bnorm.FrozenBatchNorm2d": 1}
    assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    assert model[0].weight is frozen.weight


def test_bad_arguments():
    with pytest.raises(ValueError, match="`to` must be 'bnorm' or 'torch', got 'keras'"):
        bnorm.convert(nn.BatchNorm1d(2), to="keras")
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        bnorm.convert([nn.BatchNorm1d(2)])


def test_to_torch_frozen_layers_go_to_torchvision_or_are_listed():
    try:
        import torchvision.ops.misc as tv_misc
    except Exception:  # absent, or a build that does not import beside this torch
        tv_misc = None
    model = nn.Sequential(bnorm.FrozenBatchNorm2d(3))
    if tv_misc is None:
        with pytest.warns(bnorm.LayersLeftWarning, match="torchvision is not importable"):
            bnorm.convert(model, to="torch")
        assert type(model[0]) is bnorm.FrozenBatchNorm2d
    else:
        bnorm.convert(model, to="torch")
        assert type(model[0]) is tv_misc.FrozenBatchNorm2d
        assert "num_batches_tracked" not in model.state_dict()
