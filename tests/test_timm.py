"""bnorm as a drop-in for timm's norm-act layers: parity with timm's BatchNormAct2d on every
activation, conversion of timm models both ways, freeze/unfreeze and SyncBatchNorm keeping the
activation.

The timm-free tests compare against timm's formula (``act(drop(F.batch_norm(...)))``, the
body of timm's ``BatchNormAct2d.forward``) and always run; the others import timm (see
tests/timm_shim.py: ``pip install --no-deps timm``) and skip with the reason when it is not
importable.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from timm_shim import import_timm
from torch import nn

import bnorm
from bnorm.modules.act import ACTIVATIONS
from bnorm.tools.convert import is_batch_norm_like

timm, HOW = import_timm()
needs_timm = pytest.mark.skipif(timm is None, reason=HOW)

# every named activation, and a module class and a factory given directly
ACTS = [*sorted(ACTIVATIONS), nn.SiLU, functools.partial(nn.LeakyReLU, 0.2)]
MODELS = ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"]


def _act_id(a) -> str:
    return a if isinstance(a, str) else getattr(a, "__name__", "partial")


class TimmFormula(nn.BatchNorm2d):
    """timm's BatchNormAct2d.forward, written out: F.batch_norm, then drop, then act."""

    def __init__(self, c, act: nn.Module, **kw):
        super().__init__(c, **kw)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


def _randomize(m: nn.Module) -> None:
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        for p in m.act.parameters():  # PReLU's slope
            p.uniform_(0.1, 0.3)


def _step(m: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = m(xi)
    y.backward(dy)
    grads = {n: p.grad for n, p in m.named_parameters()}
    return y.detach(), xi.grad, grads


def _compare(ours: nn.Module, theirs: nn.Module, steps: int = 2, atol=1e-5):
    """Forward, input and parameter gradients, running statistics and state_dicts, in
    training for ``steps`` batches and then in evaluation."""
    gen = torch.Generator().manual_seed(0)
    for training in [True] * steps + [False]:
        ours.train(training)
        theirs.train(training)
        x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
        dy = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
        y_a, dx_a, g_a = _step(ours, x, dy)
        y_b, dx_b, g_b = _step(theirs, x, dy)
        assert_close(y_a, y_b, atol=atol, rtol=atol, what="y")
        assert_close(dx_a, dx_b, atol=atol, rtol=atol, what="dx")
        assert g_a.keys() == g_b.keys()
        for k in g_a:
            assert_close(g_a[k], g_b[k], atol=atol, rtol=atol, what=k)
        sa, sb = ours.state_dict(), theirs.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert_close(sa[k], sb[k], atol=atol, rtol=atol, what=k)


@pytest.mark.parametrize("act", ACTS, ids=_act_id)
def test_batch_norm_act_matches_timms_formula_on_every_activation(act):
    ours = bnorm.BatchNormAct2d(3, act_layer=act, dtype=torch.float64)
    theirs = TimmFormula(3, bnorm.modules.act.create_act(act), dtype=torch.float64).double()
    _randomize(ours)
    theirs.load_state_dict(ours.state_dict())
    _compare(ours, theirs)


@settings(max_examples=15, deadline=None)
@given(
    act=st.sampled_from(["relu", "silu", "gelu", "hard_swish", "leaky_relu", "elu"]),
    momentum=st.sampled_from([0.1, 0.5, None]),
    affine=st.booleans(),
    apply_act=st.booleans(),
)
def test_hypothesis_timm_constructor_matches_the_formula(act, momentum, affine, apply_act):
    ours = bnorm.BatchNormAct2d(
        3, 1e-3, momentum, affine, True, apply_act, act, None, True, None, None, torch.float64
    )
    assert ours.eps == 1e-3 and ours.momentum == momentum and ours.affine == affine
    expected_act = bnorm.modules.act.create_act(act, apply_act=apply_act)
    assert type(ours.act) is type(expected_act) and type(ours.drop) is nn.Identity
    theirs = TimmFormula(
        3, expected_act, eps=1e-3, momentum=momentum, affine=affine, dtype=torch.float64
    )
    theirs.load_state_dict(ours.state_dict())
    _compare(ours, theirs, steps=2)


def test_act_kwargs_drop_layer_and_the_older_spelling():
    m = bnorm.BatchNormAct2d(4, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.3})
    assert type(m.act) is nn.LeakyReLU and m.act.negative_slope == 0.3 and m.act.inplace
    older = bnorm.BatchNormAct2d(4, act="leaky_relu", negative_slope=0.3)
    assert older.act.negative_slope == 0.3
    positional = bnorm.BatchNormAct2d(4, "elu", True)  # bnorm's older (C, act, memory_efficient)
    assert type(positional.act) is nn.ELU and positional.memory_efficient
    assert type(bnorm.BatchNormAct2d(4, act_layer=nn.GELU).act) is nn.GELU
    assert type(bnorm.BatchNormAct2d(4, apply_act=False).act) is nn.Identity
    dropped = bnorm.BatchNormAct2d(4, drop_layer=functools.partial(nn.Dropout, 1.0))
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(dropped(x), torch.zeros_like(x))  # drop runs before the activation
    with pytest.raises(ValueError, match="memory_efficient=True needs an invertible activation"):
        bnorm.BatchNormAct2d(4, act_layer="silu", memory_efficient=True)
    with pytest.raises(ValueError, match="takes no drop_layer"):
        bnorm.BatchNormAct2d(4, act="elu", memory_efficient=True, drop_layer=nn.Dropout)


# ---- with timm --------------------------------------------------------------------------


@needs_timm
@pytest.mark.parametrize("act", ACTS, ids=_act_id)
def test_parity_with_timms_batch_norm_act(act):
    from timm.layers import BatchNormAct2d as TimmBNAct

    theirs = TimmBNAct(3, act_layer=act, dtype=torch.float64).double()  # timm's PReLU: fp32
    ours = bnorm.BatchNormAct2d(3, act_layer=act, dtype=torch.float64)
    _randomize(ours)
    theirs.load_state_dict(ours.state_dict())  # bnorm -> timm
    _compare(ours, theirs)
    ours.load_state_dict(theirs.state_dict())  # timm -> bnorm
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)


def _bn_like_types(model):
    return [type(m) for m in model.modules() if is_batch_norm_like(m)]


@needs_timm
@pytest.mark.parametrize("name", MODELS)
def test_timm_models_convert_both_ways_and_train(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    reference = timm.create_model(name, pretrained=False, num_classes=5)
    reference.load_state_dict(model.state_dict())
    total = len(_bn_like_types(model))
    keys = list(model.state_dict())

    model, summary = bnorm.convert(model, return_summary=True)
    assert summary.num_converted == total and not summary.left
    assert summary.converted == {"timm.BatchNormAct2d -> bnorm.BatchNormAct2d": total}
    assert set(_bn_like_types(model)) == {bnorm.BatchNormAct2d}
    assert list(model.state_dict()) == keys

    # float64: through dozens of layers, float32 rounding would hide a real difference
    model.double()
    reference.double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for m in (model, reference):
        m.train()
    y_ours, y_ref = model(x), reference(x)
    assert_close(y_ours, y_ref, atol=1e-9, rtol=1e-9)
    y_ours.square().sum().backward()
    y_ref.square().sum().backward()
    ref_grads = dict(reference.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    for n, p in model.named_parameters():
        # some gradients are 0 up to rounding (a bias before a batch norm): scale-relative atol
        assert_close(p.grad, ref_grads[n].grad, atol=1e-9 * scale, rtol=1e-7, what=n)
    for k, v in reference.state_dict().items():
        assert_close(model.state_dict()[k], v, atol=1e-12, rtol=1e-10, what=k)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert_close(model(x), reference(x), atol=1e-9, rtol=1e-9)

    model, back = bnorm.convert(model, to="torch", return_summary=True)
    assert back.num_converted == total and not back.left
    assert {t.__module__ for t in _bn_like_types(model)} == {"timm.layers.norm_act"}


@needs_timm
def test_freeze_keeps_timms_activation_and_unfreeze_restores_it():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    total = len(_bn_like_types(model))
    model, summary = bnorm.freeze(model, return_summary=True)
    assert summary.converted == {"timm.BatchNormAct2d -> bnorm.FrozenBatchNormAct2d": total}
    model.train()
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # timm's own frozen layers come to bnorm through convert, and back
    model, back = bnorm.convert(model, to="torch", return_summary=True)
    assert back.converted == {"bnorm.FrozenBatchNormAct2d -> timm.FrozenBatchNormAct2d": total}
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model = bnorm.convert(model)
    model, unfrozen = bnorm.unfreeze(model, return_summary=True)
    assert unfrozen.converted == {"bnorm.FrozenBatchNormAct2d -> bnorm.BatchNormAct2d": total}
    model.eval()
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@needs_timm
def test_convert_sync_batchnorm_keeps_timms_activation():
    from timm.layers import BatchNormAct2d as TimmBNAct

    model = nn.Sequential(nn.Conv2d(3, 4, 1), TimmBNAct(4, act_layer="hard_swish"))
    model, summary = bnorm.convert_sync_batchnorm(model, return_summary=True)
    assert summary.converted == {"timm.BatchNormAct2d -> bnorm.SyncBatchNormAct": 1}
    assert type(model[1]) is bnorm.SyncBatchNormAct and type(model[1].act) is nn.Hardswish
    x = torch.randn(3, 3, 4, 4)
    assert (model(x) >= -0.375).all()  # hard-swish's minimum: the activation ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = bnorm.convert(model, to="torch")
    assert type(back[1]).__name__ == "SyncBatchNormAct" and type(back[1].act) is nn.Hardswish
    assert type(back[1]).__module__ == "timm.layers.norm_act"
    # timm's own conversion gives timm's SyncBatchNormAct; bnorm.convert makes it bnorm's
    timms = timm.layers.convert_sync_batchnorm(nn.Sequential(TimmBNAct(4, act_layer="silu")))
    ours, summary = bnorm.convert(timms, return_summary=True)
    assert summary.converted == {"timm.SyncBatchNormAct -> bnorm.SyncBatchNormAct": 1}
    assert type(ours[0].act) is nn.SiLU
    z = torch.randn(2, 4, 3, 3)
    expected = F.silu(F.batch_norm(z, None, None, training=True))
    assert_close(ours(z), expected, atol=1e-5, rtol=1e-5)


@needs_timm
def test_timms_freeze_and_unfreeze_work_on_a_model_converted_back():
    """timm's freeze_batch_norm_2d recognizes only timm's BatchNormAct2d (it turns any other
    BatchNorm2d subclass, bnorm's included, into a plain frozen batch norm without the
    activation): convert(to="torch") first, then timm's tools work, and convert brings the
    frozen layers to bnorm."""
    from timm.layers import freeze_batch_norm_2d, unfreeze_batch_norm_2d

    torch.manual_seed(0)
    model = bnorm.convert(timm.create_model("regnetx_002", pretrained=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    total = len(_bn_like_types(model))
    frozen = freeze_batch_norm_2d(bnorm.convert(model, to="torch"))
    assert {t.__name__ for t in _bn_like_types(frozen)} == {"FrozenBatchNormAct2d"}
    frozen, summary = bnorm.convert(frozen, return_summary=True)
    assert summary.converted == {"timm.FrozenBatchNormAct2d -> bnorm.FrozenBatchNormAct2d": total}
    with torch.no_grad():
        assert_close(frozen.train()(x), expected, atol=1e-5, rtol=1e-5)
    back = unfreeze_batch_norm_2d(bnorm.convert(frozen, to="torch"))
    assert len(_bn_like_types(back)) == total
