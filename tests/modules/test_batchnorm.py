"""bnorm.BatchNorm1d/2d/3d: drop-in behaviour against torch.nn's, checks, the NaN guard."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from helpers import assert_close, channels_last, is_channels_last
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnorm
from bnorm.errors import BatchNormDtypeError, NonFiniteBatchError, NonFiniteBatchWarning

PAIRS = [
    (bnorm.BatchNorm1d, nn.BatchNorm1d, (8, 4)),
    (bnorm.BatchNorm1d, nn.BatchNorm1d, (5, 4, 3)),
    (bnorm.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 2)),
    (bnorm.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 2)),
]
CONFIGS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "momentum_0.7": {"momentum": 0.7},
    "not_affine": {"affine": False},
    "no_bias": {"bias": False},
    "not_tracking": {"track_running_stats": False},
    "eps_1e-3": {"eps": 1e-3},
}


def _pair(ours_cls, torch_cls, c, **kw):
    ours = ours_cls(c, **kw)
    theirs = torch_cls(c, **{k: v for k, v in kw.items() if k != "bias"})
    if kw.get("bias") is False:
        theirs.register_parameter("bias", None)
    with torch.no_grad():  # the same, non-trivial parameters
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_close(sa[k].double(), sb[k].double(), atol=1e-6, rtol=1e-6, what=k)


WITH_LAYOUT = [(*p, False) for p in PAIRS] + [(*p, True) for p in PAIRS if len(p[2]) >= 4]


@pytest.mark.parametrize("ours_cls,torch_cls,shape,cl", WITH_LAYOUT)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_steps_then_eval_match_torch(ours_cls, torch_cls, shape, cl, config):
    ours, theirs = _pair(ours_cls, torch_cls, shape[1], **CONFIGS[config])
    for step in range(3):
        for m in (ours, theirs):
            m.train(step < 2)
        x = torch.randn(shape) * (1 + step) + step
        x = channels_last(x) if cl else x
        results = []
        for m in (ours, theirs):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape))
            grads = [xi.grad] + [p.grad.clone() for p in m.parameters()]
            m.zero_grad()
            results.append((y, grads))
        (y_ours, g_ours), (y_torch, g_torch) = results
        assert_close(y_ours, y_torch, atol=1e-5, rtol=1e-5, what=f"y, step {step}")
        assert y_ours.stride() == y_torch.stride()
        for i, (a, b) in enumerate(zip(g_ours, g_torch, strict=True)):
            assert_close(a, b, atol=2e-5, rtol=1e-5, what=f"grad {i}, step {step}")
        _assert_same_state(ours, theirs)


def test_is_a_torch_batchnorm_with_the_same_repr_and_keys():
    for ours_cls, torch_cls, _ in PAIRS:
        ours, theirs = ours_cls(7), torch_cls(7)
        assert isinstance(ours, torch_cls)
        assert repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]


def test_repr_shows_non_default_options():
    assert "on_nonfinite='raise'" in repr(bnorm.BatchNorm2d(3, on_nonfinite="raise"))
    assert "bias=False" in repr(bnorm.BatchNorm2d(3, bias=False))


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
def test_checkpoints_load_both_ways(ours_cls, torch_cls, shape):
    ours, theirs = ours_cls(shape[1]), torch_cls(shape[1])
    theirs.train()
    theirs(torch.randn(shape) + 3)
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    ours.load_state_dict(torch.load(buf))
    _assert_same_state(ours, theirs)
    ours(torch.randn(shape) - 1)
    back = torch_cls(shape[1])
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_old_checkpoint_without_num_batches_tracked_loads():
    old = nn.BatchNorm2d(3).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    m = bnorm.BatchNorm2d(3)
    m.load_state_dict(old)
    assert int(m.num_batches_tracked) == 0


def test_num_batches_tracked_counts_training_batches_only():
    m = bnorm.BatchNorm1d(3)
    for _ in range(3):
        m(torch.randn(4, 3))
    m.eval()
    m(torch.randn(4, 3))
    assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
def test_empty_batch_like_torch(ours_cls, torch_cls, shape):
    ours, theirs = _pair(ours_cls, torch_cls, shape[1], momentum=0.3)
    x = torch.randn((0, *shape[1:]), requires_grad=True)
    before = _state(ours)
    y = ours(x)
    theirs(x)
    assert y.shape == x.shape
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert torch.equal(ours.running_var, before["running_var"])
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1


def test_eval_without_running_stats_uses_batch_statistics():
    ours, theirs = _pair(bnorm.BatchNorm2d, nn.BatchNorm2d, 3, track_running_stats=False)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 3, 2, 2) * 5 + 2
    assert_close(ours(x), theirs(x), atol=1e-5)
    assert ours.running_mean is None and ours.num_batches_tracked is None


# --- bad input: clear errors, state untouched ------------------------------------------------


def _expect_error(m, x, exc, match):
    before = _state(m)
    with pytest.raises(exc, match=match):
        m(x)
    after = _state(m)
    assert list(before) == list(after)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed on error"


def test_wrong_rank():
    _expect_error(
        bnorm.BatchNorm2d(3),
        torch.randn(2, 3, 4),
        ValueError,
        r"BatchNorm2d\(3\): expected 4D input \(N, C, H, W\) \(got 3D input of shape \(2, 3, 4\)\)",
    )
    _expect_error(
        bnorm.BatchNorm1d(3), torch.randn(2, 3, 4, 4), ValueError, r"expected 2D or 3D input"
    )
    _expect_error(bnorm.BatchNorm3d(3), torch.randn(2, 3), ValueError, r"expected 5D input")


def test_wrong_channel_count():
    _expect_error(
        bnorm.BatchNorm2d(3),
        torch.randn(2, 4, 5, 5),
        RuntimeError,
        r"BatchNorm2d\(3\): expected 3 channels in dim 1 of the input, got 4 "
        r"\(input shape \(2, 4, 5, 5\)\)",
    )


def test_one_value_per_channel_in_training_only():
    m = bnorm.BatchNorm2d(3)
    _expect_error(
        m,
        torch.randn(1, 3, 1, 1),
        ValueError,
        r"BatchNorm2d\(3\): Expected more than 1 value per channel",
    )
    m.eval()
    assert m(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


@pytest.mark.parametrize("eps", [0.0, -1.0])
@pytest.mark.parametrize("training", [True, False])
def test_eps_must_be_positive(eps, training):
    m = bnorm.BatchNorm1d(4, eps=eps).train(training)
    _expect_error(
        m,
        torch.randn(3, 4),
        ValueError,
        rf"BatchNorm1d\(4\): eps must be positive( during training)?, but got {eps}",
    )


def test_dtype_errors_name_the_layer_and_leave_state():
    m = bnorm.BatchNorm1d(4)
    _expect_error(
        m,
        torch.ones(3, 4, dtype=torch.int32),
        BatchNormDtypeError,
        r"BatchNorm1d\(4\): expected a floating-point input, got torch.int32",
    )
    _expect_error(
        m,
        torch.randn(3, 4, dtype=torch.float64),
        BatchNormDtypeError,
        r"BatchNorm1d\(4\): an input of dtype torch.float64 cannot be served by weight of "
        r"dtype torch.float32",
    )
    m16 = bnorm.BatchNorm1d(4).half()
    _expect_error(m16, torch.randn(3, 4, dtype=torch.bfloat16), RuntimeError, "cannot be served")


def test_not_a_tensor():
    with pytest.raises(
        TypeError, match=r"BatchNorm1d\(4\): expected a torch.Tensor input, got list"
    ):
        bnorm.BatchNorm1d(4)([[1.0] * 4] * 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_in_a_float32_layer(dtype):
    ours, theirs = _pair(bnorm.BatchNorm2d, nn.BatchNorm2d, 3)
    x = (torch.randn(4, 3, 5, 5) * 3 + 1).to(dtype)
    y = ours(x)
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
    assert_close(y.float(), theirs(x).float(), atol=0.05, rtol=0.02)
    assert_close(ours.running_mean, theirs.running_mean, atol=1e-3, rtol=1e-3)


def test_float64_layer():
    ours, theirs = _pair(bnorm.BatchNorm1d, nn.BatchNorm1d, 3)
    ours.double()
    theirs.double()
    x = torch.randn(6, 3, dtype=torch.float64)
    assert_close(ours(x), theirs(x), atol=1e-12)


# --- the NaN/Inf guard ------------------------------------------------------------------------


def test_nonfinite_batch_leaves_all_running_state():
    m = bnorm.BatchNorm1d(3)
    m(torch.randn(8, 3))
    before = _state(m)
    x = torch.randn(8, 3)
    x[0, 0] = float("nan")
    with pytest.warns(NonFiniteBatchWarning, match=r"BatchNorm1d\(3\)"):
        m(x)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(m, k), before[k]), k


def test_nonfinite_batch_can_raise():
    m = bnorm.BatchNorm2d(3, on_nonfinite="raise")
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = float("inf")
    _expect_error(
        m, x, NonFiniteBatchError, r"BatchNorm2d\(3\): the training batch holds NaN or Inf"
    )


def test_nonfinite_batch_with_cumulative_average_keeps_the_count_right():
    m, ref = bnorm.BatchNorm1d(2, momentum=None), nn.BatchNorm1d(2, momentum=None)
    good = [torch.randn(5, 2) for _ in range(3)]
    bad = torch.full((5, 2), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteBatchWarning)
        for x in (good[0], bad, good[1], good[2]):
            m(x)
    for x in good:
        ref(x)
    _assert_same_state(m, ref)


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): on_nonfinite must be one of"):
        bnorm.BatchNorm1d(3, on_nonfinite="ignore")


# --- module plumbing --------------------------------------------------------------------------


def test_pickle_deepcopy_and_device_moves_keep_everything():
    m = bnorm.BatchNorm2d(3, on_nonfinite="raise")
    m(torch.randn(4, 3, 2, 2))
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m), copy.deepcopy(m).to("cpu")):
        assert type(clone) is bnorm.BatchNorm2d and clone.on_nonfinite == "raise"
        _assert_same_state(clone, m)


def test_channels_last_in_channels_last_out():
    m = bnorm.BatchNorm3d(3)
    x = channels_last(torch.randn(2, 3, 2, 3, 4))
    assert is_channels_last(m(x))
    m.eval()
    assert is_channels_last(m(x))


def test_parameters_get_gradients_in_eval():
    ours, theirs = _pair(bnorm.BatchNorm2d, nn.BatchNorm2d, 3)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 4, 4)
    ours(x).pow(2).sum().backward()
    theirs(x).pow(2).sum().backward()
    assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-5)
    assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-4, rtol=1e-5)


@given(
    which=st.integers(0, len(PAIRS) - 1),
    config=st.sampled_from(list(CONFIGS)),
    n=st.integers(2, 6),
    offset=st.sampled_from([0.0, 3.0, -100.0]),
    train_steps=st.integers(1, 3),
)
def test_hypothesis_modes_match_torch(which, config, n, offset, train_steps):
    ours_cls, torch_cls, shape = PAIRS[which]
    shape = (n, *shape[1:])
    ours, theirs = _pair(ours_cls, torch_cls, shape[1], **CONFIGS[config])
    for step in range(train_steps + 1):
        training = step < train_steps
        x = torch.randn(shape) * 2 + offset
        ours.train(training)
        theirs.train(training)
        assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-5)
        _assert_same_state(ours, theirs)
