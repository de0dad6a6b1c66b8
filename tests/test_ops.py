"""bnorm's operators (torch.ops.bnorm.*): schemas, fake kernels, autograd registration, the
four steps against the NumPy reference, running statistics in float64, and the composite path
that serves a machine without the C++ extension."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import assert_close, np64
from hypothesis import given
from hypothesis import strategies as st

import bnorm
from bnorm import ops
from bnorm import reference as ref

needs_extension = pytest.mark.skipif(not ops.EXTENSION, reason="the C++ extension is not built")


def _x(shape, cl=False, offset=0.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    x = x.to(dtype)
    if cl:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


# ---- the schemas and what PyTorch's tools check about each operator ------------------------


@needs_extension
def test_python_schemas_match_the_extension():
    """The schemas ops.py defines where the extension is missing are the extension's own."""
    for name, schema in ops.SCHEMAS.items():
        registered = str(getattr(torch.ops.bnorm, name).default._schema)
        assert registered == f"bnorm::{schema}", name


def _opcheck_cases():
    """Each case gets its own tensors (opcheck and autograd must not see another case's)."""

    def x():
        return _x((4, 3, 5))

    def xcl():
        return _x((4, 3, 2, 5), cl=True, seed=1)

    def w():
        return torch.rand(3, dtype=torch.float64) + 0.5

    def b():
        return torch.randn(3, dtype=torch.float64)

    def mean():
        return torch.randn(3, dtype=torch.float64)

    def var():
        return torch.rand(3, dtype=torch.float64) + 0.5

    def dy():
        return _x((4, 3, 5), seed=2)

    def stats():
        return torch.zeros(3), torch.ones(3), torch.tensor(0)

    o = torch.ops.bnorm
    yield "stats", o.stats, (x(),)
    yield "stats-cl", o.stats, (xcl(),)
    yield "transform", o.transform, (x(), mean(), var().rsqrt(), w(), b())
    yield "transform-noaffine", o.transform, (xcl(), mean(), var().rsqrt(), None, None)
    yield "backward_reduce", o.backward_reduce, (dy(), x(), mean())
    yield "backward_elemt", o.backward_elemt, (dy(), x(), mean(), var(), w(), mean(), var(), 20)
    yield "train", o.batch_norm_train, (x().requires_grad_(), w().requires_grad_(), b(), 1e-5)
    yield "train-cl", o.batch_norm_train, (xcl().requires_grad_(), None, None, 1e-3)
    yield "eval", o.batch_norm_eval, (x().requires_grad_(), w(), b(), mean(), var(), 1e-5)
    yield "backward", o.batch_norm_backward, (dy(), x(), w(), mean(), var(), 1e-5, True, [True] * 3)
    yield (
        "backward-eval",
        o.batch_norm_backward,
        (dy(), x(), None, mean(), var(), 1e-5, False, [True] * 3),
    )
    yield "update", o.update_running_stats_, (*stats(), mean(), var(), 20, 0.1)
    yield "update-cumulative", o.update_running_stats_, (*stats(), mean(), var(), 20, None)
    rm, rv, nbt = stats()
    args = (x(), w(), b(), rm.double(), rv.double(), nbt, True, 0.1, 1e-5)
    yield "batch_norm", o.batch_norm, args
    yield "batch_norm-eval", o.batch_norm, (x(), w(), b(), mean(), var(), None, False, 0.1, 1e-5)
    # the remedies' one-node operators (bnorm.modules.renorm / ghost; Python composites)
    rm, rv, nbt = stats()
    xr = (x() * 2 + 1).requires_grad_()  # r and d clip at these limits
    yield (
        "batch_renorm",
        o.batch_renorm,
        (xr, w(), b(), rm.double(), rv.double(), nbt, 1.2, 0.5, 0.1, 1e-5),
    )
    rm, rv, nbt = stats()
    # (x without requires_grad: opcheck's fake cross-check of a chunk of such an x, a non-leaf
    # view, reads its .grad and warns inside torch)
    args = (x(), w().requires_grad_(), b(), rm.double(), rv.double(), nbt, 3, 0.1, 1e-5)
    yield "ghost_batch_norm", o.ghost_batch_norm, args
    yield (
        "ghost_batch_norm-nostats",
        o.ghost_batch_norm,
        (xcl(), None, None, None, None, None, 2, 0.1, 1e-5),
    )


@pytest.mark.parametrize(
    "op,args", [pytest.param(op, args, id=name) for name, op, args in _opcheck_cases()]
)
def test_opcheck(op, args):
    """torch.library.opcheck: schema (mutations declared), fake kernel against the real one,
    autograd registration, and AOT dispatch with static and dynamic shapes."""
    torch.library.opcheck(op, args)


# ---- the steps against the float64 reference -----------------------------------------------


@given(
    shape=st.sampled_from([(7, 3), (4, 3, 5), (2, 4, 3, 3), (3, 2, 2, 2, 3), (1, 5, 1, 40)]),
    cl=st.booleans(),
    offset=st.sampled_from([0.0, 3.0, -1e4]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_steps_match_the_reference(shape, cl, offset, dtype):
    cl = cl and len(shape) in (4, 5)
    x = _x(shape, cl, offset, dtype)
    dy = _x(shape, cl, 0.0, dtype, seed=3)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    mean, var = ops.statistics(x)
    dims = (0, *range(2, x.dim()))
    x64 = x.double()
    assert_close(mean, x64.mean(dims), atol=tol * (1 + abs(offset)), what="mean")
    assert_close(var, x64.var(dims, unbiased=False), atol=tol, rtol=1e-5, what="var")
    w = torch.rand(shape[1], dtype=dtype) + 0.5
    b = torch.randn(shape[1], dtype=dtype)
    invstd = torch.rsqrt(var + 1e-5)
    y = ops.transform(x, mean, invstd, w, b)
    assert y.dtype == dtype and y.stride() == x.stride()
    y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b), eps=1e-5)
    assert_close(y, y_ref, atol=tol * 10, what="y")
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
    dx = ops.backward_elementwise(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, x.numel() // shape[1])
    dx_ref, dw_ref, db_ref = ref.backward(np64(dy), cache)
    assert_close(dx, dx_ref, atol=tol * 100, what="dx")
    assert_close(sum_dy_xmu * invstd, dw_ref, atol=tol * 100 * x.numel(), what="dweight")
    assert_close(sum_dy, db_ref, atol=tol * x.numel(), what="dbias")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    x = _x((8, 3, 4, 4), offset=2.0).to(dtype)
    y, mean, var = torch.ops.bnorm.batch_norm_train(x, None, None, 1e-5)
    assert y.dtype == dtype and mean.dtype == var.dtype == torch.float64
    assert_close(mean, x.double().mean((0, 2, 3)), atol=1e-12, what="mean")
    expected = (x.double() - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + 1e-5).view(1, -1, 1, 1)
    assert_close(y.double(), expected, atol=1e-2, what="y")


# ---- running statistics: float64 on every path ---------------------------------------------


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("composite", [False, True], ids=["operators", "composite"])
@given(
    log_var=st.floats(-12, 6),
    log_eps=st.floats(-8, -1),
    n=st.sampled_from([2, 64, 4096]),
    layer_kind=st.sampled_from(["BatchNorm1d", "BatchRenorm1d", "GhostBatchNorm1d"]),
)
def test_running_var_is_exact_for_any_variance_and_eps(
    grad, composite, log_var, log_eps, n, layer_kind, monkeypatch
):
    """Regression: bnorm rebuilt running_var from float32's 1/invstd² - eps on small inputs
    with autograd (relative error 7.7e-3 at variance 1e-8, eps 1e-3). Now the batch's float64
    variance moves it, on every layer and path: within 1e-6 of float64."""
    monkeypatch.setattr(bnorm.functional, "composite_wanted", lambda *a: composite)
    std = 10 ** (log_var / 2)
    x = (torch.randn(n, 4, generator=torch.Generator().manual_seed(n)) * std).float()
    kwargs = {"virtual_batch_size": n} if layer_kind == "GhostBatchNorm1d" else {}
    layer = getattr(bnorm, layer_kind)(4, eps=10**log_eps, momentum=1.0, **kwargs)
    layer(x.requires_grad_(grad))
    expected = x.detach().double().var(0)
    rel = ((layer.running_var.double() - expected).abs() / expected).max()
    assert float(rel) <= 1e-6


def test_issue_reproduction_small_variance_with_gradients():
    x = torch.randn(64, 4) * 1e-4
    layer = bnorm.BatchNorm1d(4, eps=1e-3, momentum=1.0)
    layer(x.requires_grad_())
    expected = x.detach().double().var(0)
    assert float(((layer.running_var.double() - expected) / expected).abs().max()) < 1e-6


def test_update_skips_a_non_finite_batch_inside_the_operator():
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(5)
    mean = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64)
    torch.ops.bnorm.update_running_stats_(rm, rv, nbt, mean, torch.ones(3).double(), 10, None)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 5
    ops.composite_update(rm, rv, nbt, mean, torch.ones(3).double(), 10, None)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 5


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_operator_and_composite_agree(momentum):
    g = torch.Generator().manual_seed(4)
    mean, var = torch.randn(5, generator=g).double(), torch.rand(5, generator=g).double()
    states = []
    for update in (torch.ops.bnorm.update_running_stats_, ops.composite_update):
        rm, rv, nbt = torch.full((5,), 0.5), torch.full((5,), 2.0), torch.tensor(3)
        update(rm, rv, nbt, mean, var, 7, momentum)
        states.append((rm, rv, nbt))
    for a, b in zip(*states, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    rate = 0.1 if momentum is not None else 1 / 4
    expected = 0.5 * (1 - rate) + mean * rate
    torch.testing.assert_close(states[0][0], expected.float())


# ---- precision far from zero, threads -------------------------------------------------------


@pytest.mark.parametrize("spatial", [6, 4, 2], ids=["6x6", "4x4 (as rows)", "2x2 (as rows)"])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_float32_far_from_zero_keeps_its_digits(offset, cl, spatial):
    x = _x((16, 8, spatial, spatial), cl=cl, offset=offset, dtype=torch.float32)
    layer = bnorm.BatchNorm2d(8)
    y = layer(x).detach()
    x64 = x.double()
    mean = x64.mean((0, 2, 3), keepdim=True)
    exact = (x64 - mean) / (x64.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert float((y.double() - exact).abs().max()) <= 5e-7 * 10  # a few ulps of the output


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape,cl",
    [((64, 32, 40, 40), False), ((64, 32, 40, 40), True), ((512, 64, 4, 4), False)],
)
def test_results_do_not_depend_on_the_thread_count(shape, cl, threads):
    before = torch.get_num_threads()
    x = _x(shape, cl=cl, dtype=torch.float32, offset=1.0)
    try:
        torch.set_num_threads(1)
        one = torch.ops.bnorm.batch_norm_train(x, None, None, 1e-5)
        torch.set_num_threads(threads)
        many = torch.ops.bnorm.batch_norm_train(x, None, None, 1e-5)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "layout", ["planes", "planes, fused", "small planes (as rows)", "channels_last", "(N, C)"]
)
def test_statistics_retake_a_shift_far_from_the_mean(layout):
    """The shift of the float32 block sums comes from the first value of the first samples; when
    those are outliers (here 1e4 above a channel of mean 5, std 1), the rounding of sums around
    it would grow with (mean - k)^2, so the channel's sums are taken again around its mean."""
    c = 16 if layout == "planes, fused" else 2  # few channels: by run; many: fused by channel
    if layout == "(N, C)":
        x = _x((5120, c), offset=5.0, dtype=torch.float32, seed=3)
        x[:16] += 1e4
    elif layout == "small planes (as rows)":  # float64 row sums: no retake needed
        x = _x((320, 16, 4, 4), offset=5.0, dtype=torch.float32, seed=3)
        x[:16, :, 0, 0] += 1e4
    else:
        x = _x((20, c, 16, 16), offset=5.0, dtype=torch.float32, seed=3)
        x[:16, :, 0, 0] += 1e4
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.ops.bnorm.stats(x)
    _, mean_t, var_t = torch.ops.bnorm.batch_norm_train(x, None, None, 1e-5)
    x64 = x.double().numpy()
    axes = (0,) if x.dim() == 2 else (0, 2, 3)
    want_mean = x64.mean(axis=axes)
    want_var = x64.var(axis=axes)
    # measured: around the mean, the means are within 4e-9 standard deviations; without the
    # retake (sums around the outliers) 1.1e-7
    for m, v in [(mean, var), (mean_t, var_t)]:
        assert (np.abs(m.numpy() - want_mean) / np.sqrt(want_var)).max() <= 3e-8
        assert (np.abs(v.numpy() - want_var) / want_var).max() <= 1e-6


@needs_extension
@given(
    n=st.integers(1, 6),
    c=st.integers(8, 40),
    s=st.sampled_from([(2,), (7,), (3, 5), (14, 14), (2, 3, 4)]),
    offset=st.sampled_from([0.0, -1e4]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    affine=st.booleans(),
)
def test_fused_training_loops_equal_the_separate_steps(n, c, s, offset, dtype, affine):
    """batch_norm_train and its backward take the loops fused per channel for NCHW-like data
    with enough channels; they must give the four separate steps' numbers bit for bit."""
    shape = (n, c, *s)
    x = _x(shape, offset=offset, dtype=dtype, seed=n * 100 + c)
    dy = _x(shape, dtype=dtype, seed=7)
    w = _x((c,), dtype=dtype, seed=1) if affine else None
    b = _x((c,), dtype=dtype, seed=2) if affine else None
    with torch.no_grad():
        y, mean, var = torch.ops.bnorm.batch_norm_train(x, w, b, 1e-3)
        dx, dw, db = torch.ops.bnorm.batch_norm_backward(
            dy, x, w, mean, var, 1e-3, True, [True, affine, affine]
        )
        mean2, var2 = torch.ops.bnorm.stats(x)
        # exactly rounded, as the C++ computes it (torch's 1 / tensor may be off by an ulp)
        invstd = torch.from_numpy(1.0 / np.sqrt(var2.numpy() + 1e-3))
        y2 = torch.ops.bnorm.transform(x, mean2, invstd, w, b)
        sum_dy, sum_dy_xmu = torch.ops.bnorm.backward_reduce(dy, x, mean2)
        dx2 = torch.ops.bnorm.backward_elemt(
            dy, x, mean2, invstd, w, sum_dy, sum_dy_xmu, x.numel() // c
        )
    for got, want in [(mean, mean2), (var, var2), (y, y2), (dx, dx2)]:
        assert torch.equal(got, want)
    if affine:
        assert torch.equal(db, sum_dy.to(dtype))
        assert_close(dw, (sum_dy_xmu * invstd).to(dtype), atol=0.0, rtol=1e-6)


# ---- without the extension -----------------------------------------------------------------


def test_without_the_extension_every_layer_runs_on_the_composite_path(tmp_path):
    """Where the extension was not built, `import bnorm` warns once with how to build it, the
    operators exist (composite kernels), and a layer computes what the extension computes."""
    x = _x((8, 3, 5, 5), offset=2.0, dtype=torch.float32)
    layer = bnorm.BatchNorm2d(3)
    y = layer(x)
    torch.save({"x": x, "y": y, "state": layer.state_dict()}, tmp_path / "ext.pt")
    script = textwrap.dedent(
        f"""
        import warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bnorm
            import bnorm.ops
        names = [w.category.__name__ for w in caught]
        assert names.count("ExtensionWarning") == 1, names
        assert not bnorm.ops.EXTENSION
        saved = torch.load({str(tmp_path / "ext.pt")!r})
        layer = bnorm.BatchNorm2d(3)
        y = layer(saved["x"].requires_grad_())
        y.sum().backward()
        torch.testing.assert_close(y, saved["y"], atol=1e-6, rtol=1e-6)
        for k, v in saved["state"].items():
            torch.testing.assert_close(layer.state_dict()[k], v, atol=1e-7, rtol=1e-6)
        scripted = torch.jit.script(bnorm.BatchNorm2d(3).eval())
        torch.testing.assert_close(scripted(saved["x"]), bnorm.BatchNorm2d(3).eval()(saved["x"]))
        print("composite ok")
        """
    )
    env = {**os.environ, "BNORM_NO_EXTENSION": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "composite ok" in done.stdout


@needs_extension
def test_importing_compiles_nothing():
    """The extension is built at install time: importing bnorm and the first training step
    load a shared library and compile nothing (no build directory, no JIT cache appears)."""
    script = (
        "import torch, bnorm; m = bnorm.BatchNorm2d(4); "
        "m(torch.randn(8, 4, 6, 6, requires_grad=True)).sum().backward(); print('ok')"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": "/nonexistent/bnorm-test"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "ok"
    assert importlib.import_module("bnorm._C").__file__.endswith(".so")
