"""bnorm.fold: batch norm folded into the preceding layer gives model.eval()'s outputs."""

import pytest
import torch
from torch import nn

import bnorm
from bnorm.tools.fold import fold_weights


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            dt = m.running_mean.dtype
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=dt))
            m.running_var.copy_(torch.rand(c, generator=g, dtype=dt) + 0.3)
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(c, generator=g, dtype=dt) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g, dtype=dt))
    return model


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check(model: nn.Module, x: torch.Tensor, remaining: int, left=None) -> nn.Module:
    """Fold ``model``; ``left``: the (name, reason start) of every layer fold must report left."""
    model = _randomize_bn(model).double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if remaining:
        with pytest.warns(bnorm.LayersLeftWarning, match=f"fold: left {remaining} "):
            folded, summary = bnorm.fold(model, return_summary=True)
    else:
        folded, summary = bnorm.fold(model, return_summary=True)
    assert len(summary.left) == remaining
    reported = [(n, why) for n, _, why in summary.left]
    for (name, why), (expected_name, start) in zip(reported, left or [], strict=False):
        assert name == expected_name and why.startswith(start), (name, why)
    assert summary.num_converted == _bn_count(model) - remaining
    x = x.double()
    with torch.no_grad():
        expected, got = model(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert _bn_count(folded) == remaining
    # the original is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    return folded


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnorm.BatchNorm2d])
def test_conv_and_depthwise_and_grouped_conv(bn_cls):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn_cls(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise
        bn_cls(8),
        nn.Conv2d(8, 12, 1, groups=4),  # grouped
        bn_cls(12, affine=False),
    )
    _check(model, torch.randn(2, 3, 9, 9), remaining=0)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_transposed_convolutions_with_groups(dim):
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    bn = {1: nn.BatchNorm1d, 2: bnorm.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    model = nn.Sequential(conv(4, 6, 3, stride=2, groups=2), bn(6), conv(6, 3, 2), bn(3))
    _check(model, torch.randn(2, 4, *(5,) * dim), remaining=0)


def test_linear_and_conv1d():
    model = nn.Sequential(
        nn.Conv1d(2, 5, 3), bnorm.BatchNorm1d(5), nn.Flatten(), nn.Linear(30, 7), nn.BatchNorm1d(7)
    )
    _check(model, torch.randn(4, 2, 8), remaining=0)


def test_bn_not_directly_after_a_foldable_layer_stays():
    model = nn.Sequential(
        nn.BatchNorm2d(3),  # first layer: nothing to fold into
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # after a ReLU: not a linear map
    )
    folded = _check(
        model,
        torch.randn(2, 3, 6, 6),
        remaining=2,
        left=[("0", "not directly after"), ("3", "follows torch.ReLU")],
    )
    assert isinstance(folded[0], nn.BatchNorm2d) and isinstance(folded[3], nn.BatchNorm2d)


class _Branchy(nn.Module):
    """A conv whose output is used twice (the BN must stay), and a traced conv->bn pair."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = bnorm.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.bn_a(self.conv_a(x))
        u = self.conv_b(z)
        return self.bn_b(u) + u  # u has two users: folding bn_b would change the sum


def test_general_module_traced_with_fx():
    folded = _check(
        _Branchy(), torch.randn(2, 3, 5, 5), remaining=1, left=[("bn_b", "not directly after")]
    )
    assert isinstance(folded.bn_a, nn.Identity)
    assert isinstance(folded.bn_b, nn.BatchNorm2d)


def test_training_mode_and_batch_statistics_are_not_folded():
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.warns(bnorm.LayersLeftWarning, match=r"1 \(torch.BatchNorm2d\): in training"):
        assert _bn_count(bnorm.fold(model.train())) == 1
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.warns(bnorm.LayersLeftWarning, match="no running statistics"):
        assert _bn_count(bnorm.fold(model.eval())) == 1


@pytest.mark.parametrize("owner", ["bnorm", "timm"])
def test_batch_norm_act_folds_and_keeps_its_drop_and_activation(owner):
    if owner == "timm":
        from timm_shim import import_timm

        timm, how = import_timm()
        if timm is None:
            pytest.skip(how)
        from timm.layers import BatchNormAct2d as BNAct
    else:
        BNAct = bnorm.BatchNormAct2d
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4, act_layer="prelu"), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].act.weight.fill_(0.2)  # PReLU's parameter: its key must stay
    keys = [k for k in model.state_dict() if not k.startswith("1.") or k.startswith("1.act")]
    folded = _check(model, torch.randn(2, 3, 6, 6), remaining=0)
    assert type(folded[1]) is nn.Sequential and isinstance(folded[1].act, nn.PReLU)
    assert list(folded.state_dict()) == keys


def test_float32_model_within_1e_5():
    model = _randomize_bn(
        nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3))
    ).eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected, got = model(x), bnorm.fold(model)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_fold_weights_matches_the_layers_it_replaces():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, groups=2).double()
    bn = _randomize_bn(nn.BatchNorm2d(6).double()).eval()
    w, b = fold_weights(
        conv.weight,
        conv.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        groups=2,
    )
    x = torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(conv(x))
    got = nn.functional.conv2d(x, w, b, groups=2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so Sequential order is the rule."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if float(x.sum()) > -1e30:
            return self.body(x)
        return x


def test_untraceable_model_falls_back_to_sequential_children():
    folded = _check(_Untraceable(), torch.randn(2, 3, 6, 6), remaining=0)
    assert isinstance(folded.body[1], nn.Identity)
