"""Quantization and fusion of models holding bnorm's batch norms: torch.ao's eager fusion
(``fuse_modules``/``fuse_modules_qat`` with :func:`bnorm.fuse_custom_config`), and the route
``bnorm.convert(model, to="torch")`` before FX quantization (``prepare_fx``/``convert_fx``) and
``torch.fx.experimental.optimization.fuse``."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.quantization import fuse_modules, fuse_modules_qat

import bnorm

# torch.ao.quantization and torch.jit warn that they are deprecated (in favour of torchao); the
# API still ships with this torch, and these tests are about models that use it
# (and its default observers warn about their own reduce_range setting)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor.*are deprecated:UserWarning"),
]


class ConvBNReLU(nn.Module):
    def __init__(self, bn_cls=bnorm.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bn_cls(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.bn2 = bn_cls(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 6)
        self.bn3 = bnorm.BatchNorm1d(6) if bn_cls is bnorm.BatchNorm2d else nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn3(
            self.fc(self.flat(self.pool(self.bn2(self.conv2(self.relu(self.bn(self.conv(x))))))))
        )


def _trained(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 2 + 1)
    return model


GROUPS = [["conv", "bn", "relu"], ["conv2", "bn2"], ["fc", "bn3"]]


def test_eager_fusion_fails_without_the_config_and_works_with_it():
    model = _trained(ConvBNReLU()).eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):
        fuse_modules(copy.deepcopy(model), GROUPS)  # torch.ao looks up exact classes
    fused = fuse_modules(
        copy.deepcopy(model), GROUPS, fuse_custom_config_dict=bnorm.fuse_custom_config()
    )
    assert type(fused.conv) is nni.ConvReLU2d and type(fused.bn) is nn.Identity
    assert type(fused.conv2) is nn.Conv2d and type(fused.bn2) is nn.Identity
    assert type(fused.fc) is nn.Linear and type(fused.bn3) is nn.Identity
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_qat_fusion_gives_torchs_fused_modules_on_the_same_tensors():
    model = _trained(ConvBNReLU()).train()
    bn_weight = model.bn.weight
    fused = fuse_modules_qat(
        model, GROUPS[:2], inplace=True, fuse_custom_config_dict=bnorm.fuse_custom_config()
    )
    assert type(fused.conv) is nni.ConvBnReLU2d and type(fused.conv2) is nni.ConvBn2d
    assert type(fused.conv[1]) is nn.BatchNorm2d  # torch's class, for torch's QAT modules
    assert fused.conv[1].weight is bn_weight  # the same parameter: an optimizer keeps it


def test_eager_static_quantization_after_fusion():
    model = _trained(ConvBNReLU()).eval()
    fused = fuse_modules(model, GROUPS, fuse_custom_config_dict=bnorm.fuse_custom_config())
    quantizable = nn.Sequential(torch.ao.quantization.QuantStub(), fused)
    quantizable.append(torch.ao.quantization.DeQuantStub())
    quantizable.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    prepared = torch.ao.quantization.prepare(quantizable)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        prepared(x)
    quantized = torch.ao.quantization.convert(prepared)
    assert type(quantized[1].conv).__name__ == "ConvReLU2d"  # torch.ao.nn.intrinsic.quantized
    with torch.no_grad():
        expected = model(x)
        got = quantized(x)
    assert float((got - expected).abs().max()) < 0.1 * float(expected.abs().max())


def test_fx_quantization_after_convert_to_torch():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = _trained(ConvBNReLU()).eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    plain = bnorm.convert(copy.deepcopy(model), to="torch")
    assert not any(type(m).__module__.startswith("bnorm") for m in plain.modules())
    prepared = prepare_fx(plain, get_default_qconfig_mapping("fbgemm"), (x,))
    with torch.no_grad():
        prepared(x)
    quantized = convert_fx(prepared)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in quantized.modules())  # fused
    with torch.no_grad():
        got = quantized(x)
    assert float((got - expected).abs().max()) < 0.1 * float(expected.abs().max())


def test_fx_optimization_fuse_after_convert_to_torch_equals_bnorm_fold():
    from torch.fx.experimental.optimization import fuse

    model = _trained(ConvBNReLU()).eval()
    x = torch.randn(4, 3, 8, 8)
    fused = fuse(bnorm.convert(copy.deepcopy(model), to="torch"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    folded = bnorm.fold(model)
    with torch.no_grad():
        assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
        assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
