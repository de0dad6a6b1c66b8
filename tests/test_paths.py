"""The layers' two routes (bnorm/functional.py): the operators (torch.ops.bnorm.*, C++) and the
composite path (aten ops, taken under torch.compile/export, torch.func and forward-mode AD) give
the same outputs, gradients and running statistics, and keep bnorm's guarantees on small
inputs."""

import numpy as np
import pytest
import torch
from helpers import assert_close, channels_last, exact_normalize, np64
from hypothesis import given
from hypothesis import strategies as st

import bnorm
from bnorm import functional as F
from bnorm import reference as ref

_COMPOSITE_WANTED = F.composite_wanted  # the real rule (the tests below patch it)

LAYERS = {2: bnorm.BatchNorm1d, 3: bnorm.BatchNorm1d, 4: bnorm.BatchNorm2d, 5: bnorm.BatchNorm3d}


def _run(layer, x, dy, grad=True):
    """Outputs, gradients (``grad``: with autograd, else under ``no_grad``) and running stats."""
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    if grad:
        y.backward(dy)
    return (
        y.detach(),
        x.grad,
        layer.weight.grad.clone() if layer.weight is not None and grad else None,
        layer.running_mean.clone() if layer.running_mean is not None else None,
        layer.running_var.clone() if layer.running_var is not None else None,
    )


@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    n=st.integers(2, 9),
    c=st.integers(1, 6),
    spatial=st.integers(1, 5),
    cl=st.booleans(),
    training=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, None]),
    affine=st.booleans(),
    grad=st.booleans(),
)
def test_operators_equal_composite_path(
    rank, n, c, spatial, cl, training, momentum, affine, grad, monkeypatch
):
    """The same layer state and input through the operators and through the composite path
    give the same outputs, gradients and running statistics, with autograd and without."""
    shape = (n, c) + (spatial,) * (rank - 2)
    g = torch.Generator().manual_seed(n * 100 + c * 10 + spatial)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    if cl and rank >= 4:
        x, dy = channels_last(x), channels_last(dy)
    running_mean = torch.rand(c, generator=g, dtype=torch.float64) * 2 - 1
    running_var = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    results = []
    real = _COMPOSITE_WANTED  # (hypothesis runs every example under one monkeypatch)
    for composite in (False, True):
        taken = []

        def spy(*args, composite=composite, taken=taken):
            taken.append(real(*args))
            return composite

        monkeypatch.setattr(F, "composite_wanted", spy)
        layer = LAYERS[rank](c, momentum=momentum, affine=affine).double()
        layer.train(training)
        layer.running_mean.copy_(running_mean)
        layer.running_var.copy_(running_var)
        results.append(_run(layer, x, dy, grad))
        assert taken and not any(taken)  # an eager call: the operators, unless forced
    for a, b, what in zip(
        *results, ("y", "dx", "dweight", "running_mean", "running_var"), strict=True
    ):
        if a is None:
            assert b is None
        else:
            assert_close(a, b, atol=1e-12, rtol=1e-12, what=what)


def test_small_training_input_matches_reference_and_torch():
    """The demo's case: a small input with gradients."""
    layer = bnorm.BatchNorm1d(50).double()
    twin = torch.nn.BatchNorm1d(50).double()
    for step in range(3):
        x = torch.randn(32, 50, dtype=torch.float64) * 1.5 + step
        dy = torch.randn(32, 50, dtype=torch.float64)
        ours = _run(layer, x, dy)
        theirs = _run(twin, x, dy)
        y_ref, cache = ref.forward_train(np64(x), np64(layer.weight), np64(layer.bias))
        dx_ref = ref.backward(np64(dy), cache)[0]
        assert_close(ours[0], y_ref, atol=1e-12, what="y")
        assert_close(ours[1], dx_ref, atol=1e-11, what="dx")
        for a, b in zip(ours, theirs, strict=True):
            assert_close(a, b, atol=1e-12, rtol=1e-12)
        layer.zero_grad()
        twin.zero_grad()
    assert int(layer.num_batches_tracked) == 3


def test_small_input_cumulative_average_counts_batches():
    layer = bnorm.BatchNorm1d(8, momentum=None).double()
    twin = torch.nn.BatchNorm1d(8, momentum=None).double()
    for seed in range(4):
        x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        _run(layer, x, torch.ones_like(x))
        _run(twin, x, torch.ones_like(x))
    assert int(layer.num_batches_tracked) == 4
    assert_close(layer.running_mean, twin.running_mean, atol=1e-14)
    assert_close(layer.running_var, twin.running_var, atol=1e-14)


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_small_input_far_from_zero_stays_precise(offset):
    """Where torch's kernel would lose digits, bnorm's keeps them on small inputs too."""
    layer = bnorm.BatchNorm1d(50)
    x = (torch.randn(32, 50, dtype=torch.float64) + offset).float().requires_grad_()
    y = layer(x)
    assert np.abs(np64(y) - exact_normalize(x)).max() <= 1e-5
    y.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    expected = np64(x).mean(axis=0) * 0.1
    assert_close(layer.running_mean, expected, atol=1e-3, rtol=1e-6, what="running_mean")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_small_input_nonfinite_batch_leaves_running_stats(bad):
    layer = bnorm.BatchNorm1d(5)
    x = torch.randn(16, 5)
    x[3, 1] = bad
    with pytest.warns(bnorm.NonFiniteBatchWarning):
        layer(x.requires_grad_())
    assert torch.equal(layer.running_mean, torch.zeros(5))
    assert torch.equal(layer.running_var, torch.ones(5))
    assert int(layer.num_batches_tracked) == 0
    layer.on_nonfinite = "raise"
    with pytest.raises(bnorm.NonFiniteBatchError):
        layer(x)
    assert int(layer.num_batches_tracked) == 0


def test_small_input_double_backward():
    layer = bnorm.BatchNorm1d(4).double()
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: layer(t), (x,))


@pytest.mark.parametrize("numel", [64, 1 << 16])
@pytest.mark.parametrize("training", [True, False])
def test_input_modified_in_place_before_backward_raises(numel, training):
    layer = bnorm.BatchNorm1d(4).train(training)
    x = torch.randn(numel // 4, 4, requires_grad=True)
    h = x * 1.0  # a non-leaf we may modify in place
    y = layer(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("shape,cl", [((7, 3), False), ((4, 3, 5, 2), True), ((3, 4, 70), False)])
def test_eval_mode_gradients_match_reference(shape, cl):
    """Evaluation with gradients (frozen statistics, e.g. fine-tuning)."""
    c = shape[1]
    layer = bnorm.BatchNorm1d(c) if len(shape) < 4 else bnorm.BatchNorm2d(c)
    layer = layer.double().eval()
    layer.running_mean.uniform_(-1, 1)
    layer.running_var.uniform_(0.5, 2)
    layer.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(shape, dtype=torch.float64) + 2
    dy = torch.randn(shape, dtype=torch.float64)
    if cl:
        x, dy = channels_last(x), channels_last(dy)
    y, dx, dw, _, _ = _run(layer, x, dy)
    args = np64(x), np64(layer.running_mean), np64(layer.running_var)
    w, b = np64(layer.weight), np64(layer.bias)
    assert_close(y, ref.forward_eval(*args, w, b, 1e-5), atol=1e-12, what="y")
    dx_ref, dw_ref, db_ref = ref.backward_eval(np64(dy), *args, w, 1e-5)
    assert_close(dx, dx_ref, atol=1e-12, what="dx")
    assert_close(dw, dw_ref, atol=1e-11, what="dweight")
    assert_close(layer.bias.grad, db_ref, atol=1e-11, what="dbias")


def test_eval_mode_gradcheck():
    layer = bnorm.BatchNorm2d(3).double().eval()
    layer.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w, b = layer.weight, layer.bias
    assert torch.autograd.gradcheck(lambda t, w_, b_: layer(t), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda t, w_, b_: layer(t), (x, w, b))


# ---- evaluation in one C++ call (bnorm._C.eval_call) ----------------------------------------

needs_extension = pytest.mark.skipif(not bnorm.ops.EXTENSION, reason="no C++ extension")


def _eval_layer(rank, c, dtype=torch.float32, affine=True):
    layer = LAYERS[rank](c, affine=affine).to(dtype).eval()
    g = torch.Generator().manual_seed(c)
    layer.running_mean.copy_(torch.randn(c, generator=g) * 3)
    layer.running_var.copy_(torch.rand(c, generator=g) + 0.1)
    if affine:
        with torch.no_grad():
            layer.weight.copy_(torch.randn(c, generator=g))
            layer.bias.copy_(torch.randn(c, generator=g))
    return layer


@needs_extension
@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    c=st.integers(1, 9),
    n=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    affine=st.booleans(),
    cl=st.booleans(),
)
def test_eval_call_equals_the_layers_python_path(rank, c, n, dtype, affine, cl):
    """The C++ evaluation entry gives the operator's numbers, bit for bit, as the layer's Python
    route (checks, functional, torch.ops.bnorm.batch_norm_eval) does."""
    layer = _eval_layer(rank, c, dtype, affine)
    x = torch.randn((n, c) + (3,) * (rank - 2), dtype=dtype) + 2.0
    if cl and rank >= 4:
        x = channels_last(x)
    fast = F.plain_eval_call(x, layer.__dict__, layer._ranks)
    assert fast is not None
    assert torch.equal(fast, layer._normalize(x))
    assert torch.equal(fast, layer(x))
    assert fast.stride() == x.stride()


@needs_extension
def test_eval_call_keeps_autograd():
    layer = _eval_layer(4, 3, torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert F.plain_eval_call(x, layer.__dict__, layer._ranks) is not None
    assert torch.autograd.gradcheck(layer, (x,))
    y = F.plain_eval_call(x, layer.__dict__, layer._ranks)
    (dx,) = torch.autograd.grad(y.sum(), x)
    expected = (layer.weight / (layer.running_var + layer.eps).sqrt()).view(1, 3, 1, 1)
    assert_close(dx, expected.expand_as(x), atol=1e-12)


class _Sub(torch.Tensor):
    pass


def _declines(case):
    """Calls that eval_call must hand back (None) to the layer's Python path."""
    layer = _eval_layer(4, 3)
    x = torch.randn(2, 3, 4, 4)
    if case == "training":
        layer.train()
    elif case == "subclass":
        x = x.as_subclass(_Sub)
    elif case == "rank":
        x = x[0]
    elif case == "channels":
        x = torch.randn(2, 4, 4, 4)
    elif case == "integer input":
        x = x.to(torch.int64)
    elif case == "half input":
        x = x.half()
    elif case == "parameter dtype":
        layer.double()
    elif case == "eps":
        layer.eps = 0.0
    elif case == "momentum":
        layer.momentum = 2.0
    elif case == "on_nonfinite":
        layer.on_nonfinite = "ignore"
    elif case == "no running stats":
        layer.running_mean = None
    elif case == "meta":
        x = torch.empty(2, 3, 4, 4, device="meta")
    return layer, x


@needs_extension
@pytest.mark.parametrize(
    "case",
    ["training", "subclass", "rank", "channels", "integer input", "half input",
     "parameter dtype", "eps", "momentum", "on_nonfinite", "no running stats", "meta"],
)  # fmt: skip
def test_eval_call_declines_what_it_does_not_plainly_serve(case):
    layer, x = _declines(case)
    assert F.plain_eval_call(x, layer.__dict__, layer._ranks) is None


@needs_extension
@pytest.mark.filterwarnings(r"ignore:.*torch\.jit.* is deprecated:DeprecationWarning")
def test_eval_call_declines_under_tracing_and_modes():
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    layer = _eval_layer(4, 3)
    x = torch.randn(2, 3, 4, 4)

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    for mode in (Seen(), Functions()):
        with mode:
            assert F.plain_eval_call(x, layer.__dict__, layer._ranks) is None
    seen = []

    class Traced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, t):
            seen.append(F.plain_eval_call(t, layer.__dict__, layer._ranks))
            return self.layer(t)

    torch.jit.trace(Traced(), (x,), check_trace=False)
    assert seen == [None]
    wrapped = []
    torch.func.vmap(
        lambda t: wrapped.append(F.plain_eval_call(t[None], layer.__dict__, layer._ranks)) or t
    )(x)
    assert wrapped == [None]


# ---- under torch.compile: the training forward with its gradient written out ------------------


def _rel_err(actual, expected) -> float:
    """Largest error relative to the largest expected value (float32 data: ~1e-7 is exact)."""
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(np64(actual) - expected).max() / max(np.abs(expected).max(), 1e-300))


@pytest.mark.parametrize(
    "shape,cl",
    [((64, 32), False), ((8, 6, 9), False), ((4, 8, 5, 5), False), ((4, 8, 5, 5), True),
     ((16, 32, 2, 2), False), ((3, 4, 2, 3, 2), False)],
)  # fmt: skip
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_compiled_training_step_matches_reference(shape, cl, affine, offset, monkeypatch):
    """Under torch.compile the layers train through ``ops.inductor_train``: output, gradients
    and running statistics within 1e-6 (relative) of the float64 reference, for data whose
    mean is 1e5 standard deviations from zero too."""
    taken = []
    real = bnorm.ops.inductor_train
    monkeypatch.setattr(bnorm.ops, "inductor_train", lambda *a: taken.append(1) or real(*a))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).float()
    dy = torch.randn(shape, generator=g)
    if cl:
        x, dy = channels_last(x), channels_last(dy)
    layer = LAYERS[len(shape)](shape[1], affine=affine)
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0, generator=g)
            layer.bias.uniform_(-1.0, 1.0, generator=g)
    xg = x.clone().requires_grad_()
    y = torch.compile(layer, fullgraph=True)(xg)
    y.backward(dy)
    assert taken, "the compiled layer did not take ops.inductor_train"

    gamma = np64(layer.weight) if affine else None
    beta = np64(layer.bias) if affine else None
    y_ref, cache = ref.forward_train(np64(x), gamma, beta, eps=layer.eps)
    dx_ref, dw_ref, db_ref = ref.backward(np64(dy), cache)
    rm_ref, rv_ref, _ = ref.update_running_stats(np.zeros(shape[1]), np.ones(shape[1]), cache.stats)
    assert _rel_err(y, y_ref) < 1e-6
    assert _rel_err(xg.grad, dx_ref) < 1e-6
    if affine:
        assert _rel_err(layer.weight.grad, dw_ref) < 1e-6
        assert _rel_err(layer.bias.grad, db_ref) < 1e-6
    assert _rel_err(layer.running_mean, rm_ref) < 1e-6
    assert _rel_err(layer.running_var, rv_ref) < 1e-6
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_inductor_train_gradcheck(affine):
    """The written-out gradient against finite differences (float64, eager)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 3, 4, generator=g, dtype=torch.float64) * 2 + 7).requires_grad_()
    w = torch.rand(3, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    w = w if affine in ("both", "weight") else None
    b = b if affine in ("both", "bias") else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return bnorm.ops.inductor_train(xx, ww, bb, 1e-5)[0]

    assert torch.autograd.gradcheck(f, inputs)
    y, mean, var = bnorm.ops.inductor_train(x.detach(), w, b, 1e-5)
    y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b))
    assert_close(y, y_ref, atol=1e-13, what="y")
    assert_close(mean, cache.stats.mean, atol=1e-13, what="mean")
    assert_close(var, cache.stats.var, atol=1e-13, what="var")


def test_only_plain_compile_takes_inductor_train(monkeypatch):
    """torch.compile alone takes the written-out gradient; torch.export, forward-mode AD and
    torch.func (which need derivatives of every order) take the composite path."""
    taken = []
    for name in ("inductor_train", "composite_train"):
        real = getattr(bnorm.ops, name)
        monkeypatch.setattr(
            bnorm.ops, name, lambda *a, name=name, real=real: taken.append(name) or real(*a)
        )
    layer = bnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True)(x)
    assert taken == ["inductor_train"]
    taken.clear()
    torch.export.export(layer, (x,))
    assert taken == ["composite_train"]
    taken.clear()
    layer(x)  # eager: the operators
    assert taken == []
    with torch.autograd.forward_ad.dual_level():
        layer(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
    assert taken == ["composite_train"]
