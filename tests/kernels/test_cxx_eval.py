"""bnorm's compiled evaluation entry (kernels/cxx_eval.py, kernels/_cxx_eval.cpp): it computes
what the Python path computes, bit for bit, for every case it takes; it declines every other
case (the Python path then checks and computes it); the layers take it in inference; and where
it cannot be built, evaluation still works."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from helpers import assert_close, channels_last, np64
from hypothesis import given
from hypothesis import strategies as st

import bnorm
from bnorm import kernels
from bnorm import reference as ref
from bnorm.kernels import cxx_eval, numba_cpu

LAYERS = {2: bnorm.BatchNorm1d, 3: bnorm.BatchNorm1d, 4: bnorm.BatchNorm2d, 5: bnorm.BatchNorm3d}


@pytest.fixture(scope="module")
def entry():
    """The compiled function. This project's machines have a C++ compiler, so it must build
    (the 1 MB evaluation goal rests on it); only BNORM_CXX_EVAL=0 excuses it."""
    if os.environ.get("BNORM_CXX_EVAL") == "0":
        pytest.skip("switched off by BNORM_CXX_EVAL=0")
    status = cxx_eval.wait()
    assert status == "ready", status
    return cxx_eval._function


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _state(c, dtype, affine, seed):
    g = torch.Generator().manual_seed(seed)
    rm = (torch.rand(c, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    w = (torch.randn(c, generator=g, dtype=torch.float64)).to(dtype) if affine[0] else None
    b = (torch.randn(c, generator=g, dtype=torch.float64)).to(dtype) if affine[1] else None
    return w, b, rm, rv


def _check_against_python_path(entry, x, w, b, rm, rv, eps):
    y = entry(x, w, b, rm, rv, eps)
    assert y is not None, "the compiled entry declined a common case"
    expected = numba_cpu.eval_forward_checked(x, rm, rv, w, b, eps)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert torch.equal(y, expected), "not the Python path's result bit for bit"
    reference = ref.forward_eval(np64(x), np64(rm), np64(rv), np64(w), np64(b), eps)
    tol = 1e-12 if x.dtype is torch.float64 else 1e-5
    assert_close(y, reference, atol=tol, rtol=tol, what="y vs the NumPy reference")


@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    n=st.integers(1, 6),
    c=st.integers(1, 7),
    spatial=st.integers(1, 5),
    cl=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    affine=st.sampled_from([(True, True), (True, False), (False, True), (False, False)]),
    offset=st.sampled_from([0.0, 3.0, 1e4]),
)
def test_small_inputs_equal_the_python_path(entry, rank, n, c, spatial, cl, dtype, affine, offset):
    shape = (n, c) + (spatial,) * (rank - 2)
    g = torch.Generator().manual_seed(n * 100 + c * 10 + spatial)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    if cl and rank >= 4:
        x = channels_last(x)
    w, b, rm, rv = _state(c, dtype, affine, seed=c)
    if offset:
        rm = rm + offset
    _check_against_python_path(entry, x, w, b, rm, rv, 1e-5)


@pytest.mark.parametrize(
    "shape,cl",
    [
        ((32, 32, 16, 16), False),  # the bench's 1 MB case: runs of 256 values
        ((16, 48, 7, 7), True),  # channels_last
        ((4096, 24), False),  # (N, C): wide blocks
        ((8, 5, 1000), False),  # a sample length that does not split evenly
        ((2, 3, 23, 29, 31), True),  # channels_last_3d
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parallel_sizes_equal_the_python_path(entry, threads, shape, cl, dtype):
    """Inputs of at least PARALLEL_MIN_NUMEL values: the kernel runs on ``threads`` threads of
    torch's pool, as on the Python path."""
    x = torch.randn(shape, dtype=torch.float64).to(dtype) * 3 + 1
    if cl:
        x = channels_last(x)
    assert x.numel() >= numba_cpu.PARALLEL_MIN_NUMEL
    w, b, rm, rv = _state(shape[1], dtype, (True, True), seed=1)
    _check_against_python_path(entry, x, w, b, rm, rv, 1e-3)


def _declined_cases():
    c = 4
    x = torch.randn(4, c, 5)
    w, b, rm, rv = _state(c, torch.float32, (True, True), seed=2)

    class Sub(torch.Tensor):
        pass

    big = torch.zeros(cxx_eval.MAX_BYTES // (4 * c), c)  # the Python path recycles its memory
    cases = {
        "float16 input": (x.half(), w.half(), b.half(), rm.half(), rv.half(), 1e-5),
        "bfloat16 input": (x.bfloat16(), *(t.bfloat16() for t in (w, b, rm, rv)), 1e-5),
        "float64 input, float32 statistics": (x.double(), w, b, rm, rv, 1e-5),
        "a non-dense input": (torch.randn(4, c, 10)[:, :, ::2], w, b, rm, rv, 1e-5),
        "a transposed input": (torch.randn(5, c, 4).transpose(0, 2), w, b, rm, rv, 1e-5),
        "an empty batch": (torch.empty(0, c, 5), w, b, rm, rv, 1e-5),
        "a rank-1 input": (torch.randn(c), w, b, rm, rv, 1e-5),
        "a tensor subclass": (x.as_subclass(Sub), w, b, rm, rv, 1e-5),
        "an input on the meta device": (x.to("meta"), w, b, rm, rv, 1e-5),
        "an input of MAX_BYTES": (big, w, b, rm, rv, 1e-5),
        "no running mean": (x, w, b, None, rv, 1e-5),
        "no running variance": (x, w, b, rm, None, 1e-5),
        "a weight of C + 1 values": (x, torch.ones(c + 1), b, rm, rv, 1e-5),
        "a bias of another dtype": (x, w, b.double(), rm, rv, 1e-5),
        "a non-contiguous running mean": (x, w, b, torch.randn(2 * c)[::2], rv, 1e-5),
        "a running variance on the meta device": (x, w, b, rm, rv.to("meta"), 1e-5),
        "a non-tensor weight": (x, [1.0] * c, b, rm, rv, 1e-5),
        "eps = 0": (x, w, b, rm, rv, 0.0),
        "a negative eps": (x, w, b, rm, rv, -1e-5),
        "an integer eps": (x, w, b, rm, rv, 1),
        "NaN eps": (x, w, b, rm, rv, float("nan")),
        "five arguments": (x, w, b, rm, rv),
    }
    grad = {
        "an input that requires grad": (x.clone().requires_grad_(), w, b, rm, rv, 1e-5),
        "a weight that requires grad": (x, w.clone().requires_grad_(), b, rm, rv, 1e-5),
        "a bias that requires grad": (x, w, b.clone().requires_grad_(), rm, rv, 1e-5),
    }
    below = (big[1:], w, b, rm, rv, 1e-5)  # one sample less: taken
    return cases, grad, below


def test_declines_every_other_case(entry):
    """Each case the Python path handles differently (other dtypes, layouts, sizes, arguments)
    comes back as None, so the caller's Python path computes it or names the problem."""
    cases, grad, below = _declined_cases()
    for what, args in cases.items():
        assert entry(*args) is None, what
    assert entry(*below) is not None, "an input just below MAX_BYTES"
    for what, args in grad.items():
        assert entry(*args) is None, what  # autograd records it: the Python path's Function
        with torch.no_grad():
            y = entry(*args)
        assert y is not None and not y.requires_grad, f"{what}, under no_grad"


def test_layer_takes_it_in_inference_and_the_python_path_otherwise(entry, monkeypatch):
    """Through a layer: under no_grad the compiled entry computes the output (and nothing in
    the layer changes); with autograd recording it declines, and the Python path's result
    (same numbers) has a gradient."""
    layer = bnorm.BatchNorm2d(6).eval()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.normal_()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    calls = []

    def spy(*args):
        y = entry(*args)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(cxx_eval, "eval_forward", spy)
    x = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        y_inference = layer(x)
    assert calls == [True]
    y_grad = layer(x.requires_grad_())
    assert calls == [True, False]
    assert torch.equal(y_inference, y_grad.detach())
    y_grad.sum().backward()
    assert x.grad is not None
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="BatchNorm2d"):  # bad input: the Python path's error
        with torch.no_grad():
            layer(torch.randn(3, 5, 4, 4))
    assert calls == [True, False]  # the channel count is the layer's check, before the entry


def test_use_backend_suspends_it(entry):
    """A forced backend (tests and benchmarks comparing backends) is not bypassed."""
    assert cxx_eval.eval_forward is entry
    with kernels.use_backend("torch_ops"):
        assert cxx_eval.eval_forward is None
        with kernels.use_backend("numba"):
            assert cxx_eval.eval_forward is None
        assert cxx_eval.eval_forward is None
    assert cxx_eval.eval_forward is entry


def test_threads_calling_at_once_get_their_own_results(entry):
    layer = bnorm.BatchNorm1d(64).eval()
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2)
    inputs = [torch.randn(512, 64) + k for k in range(4)]
    with torch.no_grad():
        expected = [numba_cpu.eval_forward_checked(x, layer.running_mean, layer.running_var,
                                                   layer.weight, layer.bias, layer.eps)
                    for x in inputs]  # fmt: skip
    errors = []

    def work(k):
        with torch.no_grad():
            for _ in range(50):
                if not torch.equal(layer(inputs[k]), expected[k]):
                    errors.append(k)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []


def test_compile_failures_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    why = cxx_eval._compile(tmp_path / "x.so")
    assert why is not None and why.startswith("no C++ compiler"), why
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    why = cxx_eval._compile(tmp_path / "x.so")
    assert why is not None and why.startswith("the compiler failed"), why
    assert not any(tmp_path.glob("*.tmp")), "the partial output is removed"


_PROBE = """
import torch, bnorm
from bnorm.kernels import cxx_eval, numba_cpu
layer = bnorm.BatchNorm2d(4).eval()
layer.running_var.data.uniform_(0.5, 2)
x = torch.randn(2, 4, 3, 3)
with torch.no_grad():
    y = layer(x)
    print(cxx_eval.wait())
    assert torch.equal(y, layer(x))
    assert torch.equal(y, numba_cpu.eval_forward_checked(x, layer.running_mean,
        layer.running_var, layer.weight, layer.bias, layer.eps))
"""


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"BNORM_CXX_EVAL": "0"}, "off (BNORM_CXX_EVAL=0)"),
        ({"CXX": "/no/such/c++"}, "unavailable: no C++ compiler"),
    ],
    ids=["switched-off", "no-compiler"],
)
def test_evaluation_works_without_it(tmp_path, env, expected):
    """In a fresh process with an empty cache: switched off, or with no compiler to build it,
    evaluation takes the Python path and gives the same result."""
    full_env = {**os.environ, "BNORM_CACHE_DIR": str(tmp_path), **env}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(expected), done.stdout


def test_a_damaged_cached_file_is_built_again(tmp_path, monkeypatch):
    """A file in the cache that does not load is removed and built again (here the rebuild
    then finds no compiler, which is what it reports)."""
    monkeypatch.setenv("BNORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    path = cxx_eval.cache_path()
    path.write_bytes(b"not a shared library")
    why = cxx_eval._build_and_load_or_why()
    assert why is not None and why.startswith("no C++ compiler"), why
    assert not path.exists()
