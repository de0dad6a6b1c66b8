"""convert, precise_bn, freeze and unfreeze compose: each keeps what the others rely on."""

import pytest
import torch
from helpers import assert_close
from torch import nn

import bnorm


def test_convert_precise_freeze_unfreeze_round_trip():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)
    )
    bnorm.convert(model)
    assert type(model[1]) is bnorm.BatchNorm2d
    data = [torch.randn(n, 3, 4, 4) + 1 for n in (5, 9)]
    bnorm.precise_bn(model, data)
    with torch.no_grad():
        inputs = torch.cat([model[0](d) for d in data])
    assert_close(model[1].running_mean, inputs.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    model.eval()
    x = torch.randn(3, 3, 4, 4)
    expected = model(x)
    bnorm.freeze(model).train()
    assert_close(model(x), expected, atol=0, rtol=0)  # frozen = bnorm's eval, bit for bit
    with pytest.raises(ValueError, match="no batch-norm layer"):
        bnorm.precise_bn(model, data)  # frozen layers are left alone: nothing to re-estimate
    bnorm.unfreeze(model)
    bnorm.convert(model, to="torch")
    assert type(model[1]) is nn.BatchNorm2d
    assert_close(model.eval()(x), expected, atol=1e-6, rtol=1e-6)
