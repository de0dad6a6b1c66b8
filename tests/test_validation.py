"""Input and argument validation of the layers and of functional.batch_norm (issue 24, items 5-6).

Every bad call raises before any state changes, with an error that names the layer; momentum is
validated; the order of the checks and the empty-batch behaviour follow torch's, and where torch
has an error of its own, its message is computed here by running torch, never copied.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import bnorm
from bnorm.functional import batch_norm

# (bnorm class, torch class, input shape with 3 channels)
LAYERS = [
    (bnorm.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3)),
    (bnorm.BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 2, 2)),
    (bnorm.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 1, 2)),
    (bnorm.SyncBatchNorm, torch.nn.BatchNorm2d, (2, 3, 2, 2)),  # not distributed: local
]
IDS = [cls.__name__ for cls, _, _ in LAYERS]


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same_state(m: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _state(m)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert value.device == after[key].device
        if value.device.type != "meta":
            assert torch.equal(value, after[key]), f"{key} changed by a call that raised"


def _layer_name(m: torch.nn.Module) -> str:
    return f"{type(m).__name__}({m.num_features})"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("cls", "torch_cls", "shape"), LAYERS, ids=IDS)
def test_meta_input_into_cpu_layer_names_the_layer_and_changes_nothing(
    cls, torch_cls, shape, training
):
    """Regression: a meta-device input raised torch's "Tensor on device cpu is not on the
    expected device meta!" from inside the call, after num_batches_tracked had advanced."""
    m = cls(3).train(training)
    before = _state(m)
    with pytest.raises(RuntimeError, match=r"same device") as info:
        m(torch.empty(shape, device="meta"))
    assert str(info.value).startswith(_layer_name(m) + ": "), info.value
    assert "meta" in str(info.value) and "cpu" in str(info.value)
    _assert_same_state(m, before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("cls", "torch_cls", "shape"), LAYERS, ids=IDS)
def test_cpu_input_into_meta_layer_names_the_layer(cls, torch_cls, shape, training):
    """The other way round: a layer moved to another device than its input (wrong device)."""
    m = cls(3).to("meta").train(training)
    with pytest.raises(RuntimeError, match=r"same device") as info:
        m(torch.randn(shape))
    assert str(info.value).startswith(_layer_name(m) + ": "), info.value


@pytest.mark.parametrize(("cls", "torch_cls", "shape"), LAYERS, ids=IDS)
def test_meta_layer_and_meta_input_give_the_shape_as_torch(cls, torch_cls, shape):
    """Meta tensors throughout is a supported way to trace shapes: the checks let it through."""
    for training in (True, False):
        ours = cls(3).to("meta").train(training)
        theirs = torch_cls(3).to("meta").train(training)
        x = torch.empty(shape, device="meta")
        y = ours(x)
        assert y.device.type == "meta" and y.shape == theirs(x).shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("cls", "torch_cls", "shape"), LAYERS, ids=IDS)
def test_fake_input_into_real_layer_names_the_layer_and_changes_nothing(
    cls, torch_cls, shape, training
):
    """Regression: a FakeTensor input reached the CPU kernel, which read its (absent) memory
    and killed the process (SIGSEGV). torch refuses real parameters with a fake input too
    (an AssertionError from FakeTensorMode); bnorm says which layer and what to do."""
    m = cls(3).train(training)
    before = _state(m)
    with FakeTensorMode():
        x = torch.randn(shape)
        with pytest.raises(RuntimeError, match=r"FakeTensor") as info:
            m(x)
    assert str(info.value).startswith(_layer_name(m) + ": "), info.value
    _assert_same_state(m, before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("cls", "torch_cls", "shape"), LAYERS, ids=IDS)
def test_fake_layer_and_fake_input_are_served_or_refused_by_name(cls, torch_cls, shape, training):
    """A layer and input both fake (tracing) must never reach a kernel that reads memory: the
    call gives a fake output of torch's shape, or an error naming the layer."""
    with FakeTensorMode():
        m = cls(3).train(training)
        x = torch.randn(shape)
        try:
            y = m(x)
        except RuntimeError as err:
            assert str(err).startswith(_layer_name(m) + ": "), err
        else:
            assert y.shape == x.shape and y.dtype == x.dtype


def test_functional_refuses_meta_and_fake_inputs_with_real_buffers():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"^batch_norm: .*same device"):
        batch_norm(torch.empty(4, 3, device="meta"), rm, rv, training=True)
    with FakeTensorMode():
        x = torch.randn(4, 3)
        with pytest.raises(RuntimeError, match=r"^batch_norm: .*FakeTensor"):
            batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def _momentum_ok(momentum: float | None) -> bool:
    return momentum is None or (math.isfinite(momentum) and 0.0 <= momentum <= 1.0)


MOMENTA = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0),
    st.sampled_from([0.0, 1.0, -0.0, float("nan"), float("inf"), -1e-300, 1.0 + 2**-52]),
)


@given(momentum=MOMENTA, index=st.integers(0, len(LAYERS) - 1))
def test_momentum_is_validated_at_construction(momentum, index):
    """Regression: NaN, Inf or a momentum outside [0, 1] was accepted (torch accepts it too)
    and poisoned the running statistics at the first training step."""
    cls, _, shape = LAYERS[index]
    if _momentum_ok(momentum):
        m = cls(3, momentum=momentum)
        m(torch.randn(shape))
        assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
    else:
        with pytest.raises(ValueError, match=rf"^{cls.__name__}\(3\): momentum must be"):
            cls(3, momentum=momentum)


@given(momentum=MOMENTA, training=st.booleans())
def test_momentum_is_validated_by_functional_batch_norm(momentum, training):
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(4, 3) + 5.0
    if (momentum is None and training) or not _momentum_ok(momentum):
        # None in training: the cumulative average needs num_batches_tracked, which the
        # function has not (in evaluation momentum is not used)
        with pytest.raises(ValueError, match=r"^batch_norm: momentum"):
            batch_norm(x, rm, rv, training=training, momentum=momentum)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    else:
        batch_norm(x, rm, rv, training=training, momentum=momentum)
        assert torch.isfinite(rm).all() and torch.isfinite(rv).all()


def test_momentum_of_another_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"^BatchNorm1d\(3\): momentum must be a number"):
        bnorm.BatchNorm1d(3, momentum="0.1")  # type: ignore[arg-type]


def _torch_error(fn) -> BaseException:
    try:
        fn()
    except Exception as err:  # whatever torch raises is what is compared
        return err
    raise AssertionError("torch accepted the call")


@pytest.mark.parametrize(("cls", "torch_cls", "shape"), LAYERS, ids=IDS)
def test_eps_is_checked_before_dtype_as_torch(cls, torch_cls, shape):
    """Regression: with eps=-1 and a float64 input into a float32 layer, torch raises
    ValueError("batch_norm eps must be positive during training, ...") and bnorm raised its
    dtype error; both checks fail here, and the eps one must come first, in torch's words."""
    x = torch.randn(shape, dtype=torch.float64)
    theirs = _torch_error(lambda: torch_cls(3, eps=-1.0)(x))
    assert isinstance(theirs, ValueError)
    m = cls(3, eps=-1.0)
    before = _state(m)
    with pytest.raises(ValueError) as info:
        m(x)
    wording = str(theirs).removeprefix("batch_norm ")
    assert str(info.value) == f"{_layer_name(m)}: {wording}"
    _assert_same_state(m, before)


@pytest.mark.parametrize("training", [True, False])
def test_functional_eps_error_in_torch_words(training):
    x = torch.randn(4, 3, dtype=torch.float64)
    rm, rv = torch.zeros(3), torch.ones(3)
    theirs = _torch_error(
        lambda: torch.nn.functional.batch_norm(x, rm, rv, training=training, eps=-1.0)
    )
    with pytest.raises(ValueError) as info:
        batch_norm(x, rm, rv, training=training, eps=-1.0)
    assert str(info.value) == "batch_norm: " + str(theirs).removeprefix("batch_norm ")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("cls", "torch_cls", "shape"), LAYERS, ids=IDS)
def test_empty_float64_batch_into_float32_layer_is_empty_as_torch(cls, torch_cls, shape, training):
    """Regression: an empty float64 batch into a float32 layer returns an empty output in torch
    and raised a dtype error in bnorm. Output, dtype and num_batches_tracked as torch's."""
    x = torch.empty((0, *shape[1:]), dtype=torch.float64)
    ours, theirs = cls(3).train(training), torch_cls(3).train(training)
    y, want = ours(x), theirs(x)
    assert y.shape == want.shape and y.dtype == want.dtype
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name))


@pytest.mark.parametrize("training", [True, False])
def test_functional_empty_float64_batch_with_float32_buffers_as_torch(training):
    x = torch.empty(0, 3, 2, dtype=torch.float64)
    rm, rv = torch.zeros(3), torch.ones(3)
    want = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=training)
    y = batch_norm(x, rm, rv, training=training)
    assert y.shape == want.shape and y.dtype == want.dtype
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
