"""The numba backend: fused paths, threading, awkward sizes and layouts, precision far from zero.

The step-by-step functions are also covered, with every other backend, by test_backends.py.
Tensors here are small; ``PARALLEL_MIN_NUMEL`` is lowered so that they still go through the
multi-threaded loops (and their uneven splits), not only the serial ones.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_close, channels_last, exact_normalize, is_channels_last, np64

import bnorm
from bnorm import reference as ref
from bnorm.functional import batch_norm
from bnorm.kernels import BACKENDS, select_backend, use_backend

numba_cpu = pytest.importorskip("bnorm.kernels.numba_cpu")

# (shape, channels_last): C=1, N=2, spatial 1, sizes that split unevenly over 2 threads
SHAPES = [
    ((7, 3), False),
    ((2, 1), False),
    ((5, 3, 7), False),
    ((3, 5, 1, 1), False),
    ((3, 5, 3, 5), True),
    ((2, 1, 3, 3), True),
    ((3, 4, 2, 3, 5), False),
    ((3, 4, 2, 3, 5), True),
    ((9, 6, 1), False),
    # runs of RUN_MIN values and more (the run family); 15 and 9 runs split over 2 threads in
    # the middle of a channel's sequence, so a thread's first run is not channel 0
    ((3, 5, 40), False),
    ((3, 3, 6, 7), False),
    # the blocked training passes (channel_block): 9 and 16 channels split over 2 threads
    ((3, 9, 40), False),
    ((2, 16, 6, 6), False),
    # wide blocks (short runs, few samples): (N, C), and runs of 5 values
    ((5, 11), False),
    ((3, 13, 5), False),
]


@pytest.fixture(autouse=True)
def run_blocks(monkeypatch):
    """The run family's channel blocks on, whatever this processor's default (RUN_BLOCK_BYTES):
    the shapes above are chosen to reach them; the two-pass loops are forced where a test says
    so (the "two-pass" case of GEOMETRIES, and the tests that set the budget themselves)."""
    monkeypatch.setattr(numba_cpu, "RUN_BLOCK_BYTES", numba_cpu.loops.BLOCK_BYTES)


@pytest.fixture(params=["serial", "threads1", "threads2", "threads2-numba-pool"])
def threading_mode(request, monkeypatch):
    """Serial loops; parallel loops on 1 thread; on 2 threads of torch's OpenMP pool (where
    torch's runtime was found, else numba's); on 2 threads of numba's pool (the fallback)."""
    before = torch.get_num_threads()
    if request.param != "serial":
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_NUMEL", 1)
    if request.param == "threads2-numba-pool":
        monkeypatch.setattr(numba_cpu, "_pools", {torch.float32: 0, torch.float64: 0})
        monkeypatch.setattr(numba_cpu, "_TORCH_OPENMP", None)  # as where torch's is not found
    torch.set_num_threads(1 if request.param == "threads1" else 2)
    yield request.param
    torch.set_num_threads(before)


def test_torch_openmp_runtime_is_found_on_linux():
    """Linux wheels of torch run on GNU OpenMP: bnorm must find its runtime there, or the
    kernels would silently run on a second pool of threads."""
    if sys.platform != "linux" or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("not a GNU OpenMP build of torch on Linux")
    assert numba_cpu._TORCH_OPENMP is not None
    assert numba_cpu.thread_pool() == "torch's OpenMP pool"
    assert numba_cpu._pool(torch.float32) != 0


def _x(shape, cl, dtype=torch.float64, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + offset).to(dtype)
    return channels_last(x) if cl else x


def test_numba_is_the_default_cpu_backend():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert select_backend(torch.zeros(2, 3, dtype=dtype)).name == "numba"
    with use_backend("torch_ops"):
        assert select_backend(torch.zeros(2, 3)).name == "torch_ops"


@pytest.mark.parametrize("shape,cl", SHAPES)
def test_fused_training_forward_backward_and_running_stats(shape, cl, threading_mode):
    c = shape[1]
    x = _x(shape, cl, offset=2.0).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    rm0, rv0 = np64(rm), np64(rv)
    y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-4)
    dy = _x(shape, cl, seed=3)
    y.backward(dy)

    y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b), eps=1e-4)
    dx_ref, dw_ref, db_ref = ref.backward(np64(dy), cache)
    rm_ref, rv_ref, _ = ref.update_running_stats(rm0, rv0, cache.stats, 0.3)
    assert_close(y, y_ref, atol=1e-12, what="y")
    assert_close(x.grad, dx_ref, atol=1e-11, what="dx")
    assert_close(w.grad, dw_ref, atol=1e-11, what="dweight")
    assert_close(b.grad, db_ref, atol=1e-11, what="dbias")
    assert_close(rm, rm_ref, atol=1e-13, what="running_mean")
    assert_close(rv, rv_ref, atol=1e-13, what="running_var")
    assert is_channels_last(y) if cl else y.is_contiguous()
    assert is_channels_last(x.grad) if cl else x.grad.is_contiguous()


@pytest.mark.parametrize("shape,cl", SHAPES)
def test_fused_eval_forward(shape, cl, threading_mode):
    c = shape[1]
    x = _x(shape, cl, dtype=torch.float32, offset=1.0)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    with torch.no_grad():
        y = batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    expected = ref.forward_eval(np64(x), np64(rm), np64(rv), np64(w), np64(b), 1e-3)
    assert_close(y, expected, atol=2e-6, rtol=1e-6)
    assert y.dtype == torch.float32
    assert is_channels_last(y) if cl else y.is_contiguous()


@pytest.mark.parametrize("shape,cl", SHAPES[:5])
def test_fused_path_equals_step_by_step_path_in_float32(shape, cl, threading_mode):
    c = shape[1]
    x = _x(shape, cl, dtype=torch.float32, offset=3.0)
    dy = _x(shape, cl, dtype=torch.float32, seed=5)
    results = []
    for fused in (True, False):
        xr = x.clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, c).requires_grad_()
        rm, rv = torch.zeros(c), torch.ones(c)
        if fused:
            y = batch_norm(xr, rm, rv, w, None, training=True)
        else:
            # the four steps of the same backend, one by one (the contract SyncBatchNorm uses)
            be = BACKENDS["numba"]
            mean, var = be.statistics(x)
            invstd = torch.rsqrt(var + 1e-5)
            y = be.transform(x, mean, invstd, w.detach(), None)
            sums = be.backward_reduce(dy, x, mean)
            count = x.numel() // c
            xr.grad = be.backward_elementwise(dy, x, mean, invstd, w.detach(), *sums, count)
            w.grad = (sums[1] * invstd).float()
        if fused:
            y.backward(dy)
        results.append((y.detach(), xr.grad, w.grad))
    for a, b_, what in zip(results[0], results[1], ("y", "dx", "dweight"), strict=True):
        assert_close(a, b_, atol=2e-5, rtol=1e-5, what=what)


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
@pytest.mark.parametrize("cl", [False, True])
def test_precision_far_from_zero_with_kernels(offset, cl, threading_mode):
    x = _x((16, 4, 6, 5), cl, dtype=torch.float32, offset=offset, seed=7)
    y = batch_norm(x, None, None, training=True)
    assert np.abs(np64(y) - exact_normalize(x)).max() <= 1e-4
    # the same in evaluation, with the batch's exact statistics as running statistics
    d = np64(x)
    axes = (0, 2, 3)
    rm = torch.tensor(d.mean(axis=axes), dtype=torch.float32)
    rv = torch.tensor(d.var(axis=axes), dtype=torch.float32)
    with torch.no_grad():
        y_eval = batch_norm(x, rm, rv, training=False, eps=0.0)
    expected = (d - np64(rm).reshape(1, -1, 1, 1)) / np.sqrt(np64(rv)).reshape(1, -1, 1, 1)
    assert np.abs(np64(y_eval) - expected).max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_low_precision_inputs(dtype, cl, threading_mode):
    x = _x((6, 3, 4, 5), cl, dtype=dtype, offset=4.0).requires_grad_()
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.5)
    dy = _x((6, 3, 4, 5), cl, dtype=dtype, seed=9)
    y.backward(dy)
    assert y.dtype == x.grad.dtype == dtype
    assert rm.dtype == torch.float32
    y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b))
    dx_ref = ref.backward(np64(dy), cache)[0]
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3  # one rounding to the output dtype
    assert_close(y, y_ref, atol=tol * 4, what="y")
    assert_close(x.grad, dx_ref, atol=tol * 4, what="dx")
    rm_ref, rv_ref, _ = ref.update_running_stats(np.zeros(3), np.ones(3), cache.stats, 0.5)
    assert_close(rm, rm_ref, atol=1e-6, what="running_mean")
    assert_close(rv, rv_ref, atol=1e-5, rtol=1e-6, what="running_var")
    assert is_channels_last(y) if cl else y.is_contiguous()


def test_non_contiguous_input(threading_mode):
    base = _x((6, 10, 7), False)
    x = base[:, ::2, 1:].requires_grad_()  # strided: neither contiguous nor channels_last
    y = batch_norm(x, None, None, training=True)
    y.backward(torch.ones_like(y))
    y_ref, cache = ref.forward_train(np64(x))
    assert_close(y, y_ref, atol=1e-12)
    assert_close(x.grad, ref.backward(np.ones(x.shape), cache)[0], atol=1e-11)


def test_cumulative_average_and_counter(threading_mode):
    layer = bnorm.BatchNorm2d(3, momentum=None).double()
    torch_layer = torch.nn.BatchNorm2d(3, momentum=None).double()
    for seed in range(3):
        x = _x((4, 3, 2, 3), False, offset=1.0, seed=seed)
        layer(x)
        torch_layer(x)
    assert int(layer.num_batches_tracked) == 3
    assert_close(layer.running_mean, torch_layer.running_mean, atol=1e-13)
    assert_close(layer.running_var, torch_layer.running_var, atol=1e-13)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_leaves_running_stats_on_the_fused_path(bad, threading_mode):
    layer = bnorm.BatchNorm1d(4)
    x = torch.randn(8, 4)
    x[3, 2] = bad
    with pytest.warns(bnorm.NonFiniteBatchWarning):
        layer(x.requires_grad_())
    with pytest.warns(bnorm.NonFiniteBatchWarning), torch.no_grad():
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(4))
    assert torch.equal(layer.running_var, torch.ones(4))
    assert int(layer.num_batches_tracked) == 0
    layer.on_nonfinite = "raise"
    with pytest.raises(bnorm.NonFiniteBatchError):
        layer(x)
    assert int(layer.num_batches_tracked) == 0


def test_numba_threads_follow_torch(monkeypatch):
    """On numba's pool (the fallback) the kernels set numba's count to torch's; on torch's pool
    the team is torch's own, and numba's count is left alone."""
    numba = pytest.importorskip("numba")
    before = torch.get_num_threads()
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_NUMEL", 1)
    monkeypatch.setattr(numba_cpu, "_pools", {torch.float32: 0, torch.float64: 0})
    monkeypatch.setattr(numba_cpu, "_TORCH_OPENMP", None)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            numba_cpu.statistics(torch.randn(4, 3))
            assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "first_call",
    [
        "bnorm.BatchNorm2d(8)(torch.randn(64, 8, 16, 16))",  # a parallel kernel
        # a small input runs on the calling thread, but the first call of any parallel numba
        # function starts the threading layer all the same; after torch's own kernel has run
        # (the small-input path with gradients), that start reset torch's count (regression)
        "b = bnorm.BatchNorm1d(8); b(torch.randn(4, 8, requires_grad=True)).sum().backward()\n"
        "with torch.no_grad(): b(torch.randn(4, 8))",
        "b = bnorm.BatchNorm1d(8); b(torch.randn(4, 8, requires_grad=True)).sum().backward()\n"
        "b.eval()(torch.randn(4, 8))",
    ],
)
def test_first_use_keeps_torch_thread_count(first_call):
    """numba's OpenMP pool, started by bnorm's first kernel, must not reset torch's threads."""
    code = (
        "import torch, bnorm\n"
        "torch.set_num_threads(1)\n"
        f"{first_call}\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"


@pytest.mark.parametrize("env", [{"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true"}])
def test_kernels_correct_when_openmp_gives_fewer_threads(env):
    """OpenMP may run a region on fewer threads than asked for (a thread limit, dynamic
    adjustment under load): every part of the work must still be done, and a barrier inside a
    region (the blocked forward's parallel finish, from FINISH_MIN_CHANNELS channels: the
    (16, 8192) input) must not wait for threads that are not there. Training forward, backward
    and evaluation on 2 requested threads, against torch."""
    code = (
        "import torch, bnorm\n"
        "torch.set_num_threads(2)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "diffs = []\n"
        "cases = [((64, 8, 40, 40), False), ((64, 8, 40, 40), True), ((16, 8192), False)]\n"
        "for shape, cl in cases:\n"
        "    x = torch.randn(shape, generator=g) * 2 + 1\n"
        "    dy = torch.randn(shape, generator=g)\n"
        "    xi = x.contiguous(memory_format=torch.channels_last) if cl else x\n"
        "    outs = []\n"
        "    for nn in (bnorm, torch.nn):\n"
        "        layer = (nn.BatchNorm2d if x.dim() == 4 else nn.BatchNorm1d)(shape[1])\n"
        "        xr = xi.clone().requires_grad_()\n"
        "        y = layer(xr)\n"
        "        y.backward(dy)\n"
        "        with torch.no_grad():\n"
        "            e = layer.eval()(xi)\n"
        "        outs.append((y.detach(), xr.grad, layer.running_var, e))\n"
        "    diffs += [float((a - b).abs().max()) for a, b in zip(*outs)]\n"
        "print(max(diffs))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, **env},
    )  # fmt: skip
    assert float(done.stdout) < 1e-4


def test_torch_pool_can_be_switched_off_by_the_environment():
    """``BNORM_TORCH_POOL=0``: the kernels run on numba's pool, with the same results."""
    code = (
        "import torch, bnorm\n"
        "from bnorm.kernels import numba_cpu\n"
        "print(numba_cpu.thread_pool())\n"
        "x = torch.randn(64, 8, 40, 40, generator=torch.Generator().manual_seed(0))\n"
        "y = bnorm.BatchNorm2d(8)(x)\n"
        "print(numba_cpu._pool(torch.float32), float(y.mean(dim=(0, 2, 3)).abs().max()))\n"
    )
    env = {**os.environ, "BNORM_TORCH_POOL": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    pool, line = done.stdout.splitlines()
    assert pool == "numba's pool"
    address, largest_mean = line.split()
    assert address == "0" and float(largest_mean) < 1e-6


@pytest.mark.parametrize(
    "shape,cl",
    [((4096, 8), False), ((64, 8, 6, 6), True), ((40, 3, 9), False), ((32, 4, 50, 50), False)],
)
def test_statistics_with_outliers_where_the_shift_is_taken(shape, cl, threading_mode):
    """The float32 block sums are precise only around a shift near the mean; the shift is taken
    from the first samples. Make those samples outliers, 1e4 off: the statistics stay exact
    (in the large batch, the shift is then 16 standard deviations from the mean and the sums
    are taken again around the mean; a mutation that skips that fails here)."""
    x = _x(shape, cl, dtype=torch.float64, seed=11)
    x[: min(16, shape[0])] += 1e4
    x32 = x.float()
    x32 = channels_last(x32) if cl else x32
    mean, var = numba_cpu.statistics(x32)
    stats = ref.batch_stats(np64(x32))
    # what matters for the output: the mean's error relative to the spread, and the variance's
    assert np.all(np.abs(np64(mean) - stats.mean) <= 1e-6 * np.sqrt(stats.var))
    assert_close(var, stats.var, atol=0, rtol=1e-6, what="var")


def test_long_runs_are_summed_in_blocks(threading_mode):
    """Runs longer than RUN_BLOCK (here 5000 values per run) keep float64 precision overall."""
    x = _x((3, 2, 5000), False, dtype=torch.float32, offset=1e4, seed=5)
    mean, var = numba_cpu.statistics(x)
    stats = ref.batch_stats(np64(x))
    assert np.all(np.abs(np64(mean) - stats.mean) <= 1e-6 * np.sqrt(stats.var))
    assert_close(var, stats.var, atol=0, rtol=1e-6, what="var")


@pytest.mark.parametrize(
    "geometry", [(32, 50, 1), (8192, 256, 1), (50176, 64, 1), (100, 3, 1), (4, 5, 6), (7, 3, 1)]
)
def test_column_rows_hold_whole_samples(geometry):
    """The column family's rows are whole samples, wide enough, and whole AVX-512 vectors
    where the batch allows; the tail is less than one row."""
    from bnorm.kernels import _numba_loops as loops

    a, c, b = geometry
    width, rows = loops.plan(a, c, b)
    assert width % (c * b) == 0 and rows >= 1
    q = width // (c * b)
    assert rows * q <= a < (rows + 1) * q
    if 16 * q <= a and c * b < 16:
        assert width % 16 == 0


# --- direct calls with mismatched sizes: an error, never a read past an end ----------------------


def _step_calls(x, dy, good, bad):
    """Each step called with one argument of the wrong size (``bad``) and the rest right."""
    s = good
    return {
        "transform mean": lambda: numba_cpu.transform(x, bad, s, s, s),
        "transform invstd": lambda: numba_cpu.transform(x, s, bad, s, s),
        "transform weight": lambda: numba_cpu.transform(x, s, s, bad, None),
        "transform bias": lambda: numba_cpu.transform(x, s, s, None, bad),
        "backward_reduce mean": lambda: numba_cpu.backward_reduce(dy, x, bad),
        "backward_elementwise weight": lambda: numba_cpu.backward_elementwise(
            dy, x, s, s, bad, s, s, 10
        ),
        "backward_elementwise sum_dy": lambda: numba_cpu.backward_elementwise(
            dy, x, s, s, s, bad, s, 10
        ),
    }


@pytest.mark.parametrize("call", list(_step_calls(*[None] * 4)))
def test_steps_refuse_per_channel_tensors_of_another_size(call):
    x = torch.randn(5, 8, 4, 4)
    dy = torch.randn_like(x)
    good = torch.ones(8, dtype=torch.float64)
    bad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="should contain 8 elements"):
        _step_calls(x, dy, good, bad)[call]()


def test_backward_refuses_a_gradient_of_another_shape():
    x = torch.randn(5, 8, 4, 4)
    m = torch.zeros(8, dtype=torch.float64)
    small = torch.randn(5, 8, 2, 2)
    with pytest.raises(ValueError, match=r"gradient has shape \(5, 8, 2, 2\)"):
        numba_cpu.backward_reduce(small, x, m)
    with pytest.raises(ValueError, match="gradient has shape"):
        numba_cpu.backward_elementwise(small, x, m, m + 1, None, m, m, 10)
    stats = torch.cat([m, m + 1])
    with pytest.raises(ValueError, match="gradient has shape"):
        numba_cpu.train_backward(small, x, stats, None, None, (True, False, False))


def test_kernels_called_from_two_python_threads_at_once():
    """The kernels release the GIL and launch their parallel regions from whichever thread calls
    them (on torch's pool, each calling thread leads a team of its own): two Python threads
    training two layers at once get what each gets alone."""
    import threading

    def run(seed, out):
        g = torch.Generator().manual_seed(seed)
        layer = bnorm.BatchNorm2d(8)
        for _ in range(10):
            x = torch.randn(16, 8, 24, 24, generator=g, requires_grad=True)
            layer(x).square().sum().backward()
            out.append((x.grad.clone(), layer.running_mean.clone(), layer.weight.grad.clone()))
        layer.eval()
        with torch.no_grad():
            out.append((layer(torch.randn(16, 8, 24, 24, generator=g)),))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone = [[], []]
        for seed in (0, 1):
            run(seed, alone[seed])
        together = [[], []]
        threads = [threading.Thread(target=run, args=(seed, together[seed])) for seed in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(alone, together, strict=True):
        assert len(a) == len(b) == 11
        for step_a, step_b in zip(a, b, strict=True):
            for u, v in zip(step_a, step_b, strict=True):
                assert torch.equal(u, v)


# --- the blocked training passes (loops.channel_block) -----------------------------------------

BLOCKED = (64, 16, 1200)  # float32: 300 KB per channel, so 3 channels per forward block and 1
# per backward block (dy and x); each of 2 threads gets 8 channels: forward blocks of 3, 3, 2
# wide blocks (runs shorter than RUN_MIN, at most WIDE_MAX_SAMPLES samples): runs of 5 values,
# 819 channels (WIDE_COLS values) per block, so each of 2 threads' 850 channels takes 2 blocks;
# (N, C) with 2048 channels per forward block and 1024 per backward block (dy and x)
WIDE_RUNS = (64, 1700, 5)
WIDE_NC = (128, 4500)
# BLOCKED again with the run family's blocks off (RUN_BLOCK_BYTES = 0): the two-pass loops
GEOMETRIES = pytest.mark.parametrize(
    "geometry",
    [(BLOCKED, True), (BLOCKED, False), (WIDE_RUNS, True), (WIDE_NC, True)],
    ids=["blocked", "two-pass", "wide-runs", "wide-nc"],
    indirect=True,
)


@pytest.fixture
def geometry(request, monkeypatch):
    """The shape of a GEOMETRIES case, with the run family's blocks on or off as it says."""
    shape, blocks = request.param
    if not blocks:
        monkeypatch.setattr(numba_cpu, "RUN_BLOCK_BYTES", 0)
    return shape


def test_channel_blocks_apply_where_the_data_allows():
    budget = numba_cpu.loops.BLOCK_BYTES

    def blocks(*geometry, run_bytes=budget):
        return numba_cpu.loops.channel_block(*geometry, run_bytes)

    assert blocks(64, 64, 784, 4, 1, 2) == budget // (64 * 784 * 4)  # the bench's 12 MB case
    assert blocks(64, 16, 1200, 4, 1, 2) == 3 and blocks(64, 16, 1200, 4, 2, 2) == 1
    assert blocks(64, 16, 1200, 4, 1, 2, run_bytes=700_000) == 2  # the caller's budget
    assert blocks(256, 64, 31, 4, 1, 2) == 0  # short runs, many samples: the column family
    # short runs in a small batch: wide blocks of at most WIDE_COLS values per sample
    wide = numba_cpu.loops.WIDE_COLS
    assert blocks(64, 64, 31, 4, 1, 2) == min(budget // (64 * 31 * 4), wide // 31)
    assert blocks(8, 8192, 1, 4, 1, 2) == wide and blocks(8, 8192, 1, 4, 2, 2) == wide
    assert blocks(128, 4500, 1, 4, 1, 2) == 2048 and blocks(128, 4500, 1, 4, 2, 2) == 1024
    assert blocks(64, 1700, 5, 4, 1, 2) == wide // 5 and blocks(64, 1700, 5, 4, 2, 2) == 409
    assert blocks(64, 7, 784, 4, 1, 2) == 0  # fewer than 4 channels per thread
    assert blocks(128, 64, 3136, 4, 1, 2) == 0  # one channel is more than a block
    # without a budget for runs (RUN_BLOCK_BYTES = 0) runs take the two-pass loops, and wide
    # blocks are unchanged
    assert blocks(64, 64, 784, 4, 1, 2, run_bytes=0) == 0
    assert blocks(64, 16, 1200, 4, 2, 2, run_bytes=0) == 0
    assert blocks(8, 8192, 1, 4, 1, 2, run_bytes=0) == wide
    assert blocks(64, 1700, 5, 4, 2, 2, run_bytes=0) == 409


def test_run_blocks_follow_the_processor_unless_the_environment_says(monkeypatch, tmp_path):
    """The default: blocks on Intel processors (where they were measured faster), the two-pass
    loops elsewhere (slower with blocks on AMD's; unmeasured on others); BNORM_CHANNEL_BLOCKS
    overrides it either way."""
    from bnorm import _platform

    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(_platform, "CPUINFO", info)
    monkeypatch.delenv("BNORM_CHANNEL_BLOCKS", raising=False)
    budget = numba_cpu.loops.BLOCK_BYTES
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert numba_cpu._run_block_bytes() == budget
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n")
    assert numba_cpu._run_block_bytes() == 0
    monkeypatch.setenv("BNORM_CHANNEL_BLOCKS", "1")
    assert numba_cpu._run_block_bytes() == budget
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    monkeypatch.setenv("BNORM_CHANNEL_BLOCKS", "0")
    assert numba_cpu._run_block_bytes() == 0
    monkeypatch.setenv("BNORM_CHANNEL_BLOCKS", "yes")
    with pytest.raises(ValueError, match="BNORM_CHANNEL_BLOCKS must be 0 or 1, got 'yes'"):
        numba_cpu._run_block_bytes()
    monkeypatch.delenv("BNORM_CHANNEL_BLOCKS")
    info.unlink()  # not Linux: the vendor is unknown
    assert numba_cpu._run_block_bytes() == 0


def test_run_blocks_and_two_pass_loops_agree(threading_mode, monkeypatch):
    """The same training step with the run family's blocks and without: the kernels get the
    budget RUN_BLOCK_BYTES holds at the call, and both ways agree within float32 rounding (the
    sums are the same runs', added in another order across threads)."""
    seen = []

    def recording(kernel):
        def call(*args):
            seen.append(args[-2])  # run_bytes, just before the pool's address
            return kernel(*args)

        return call

    for name in ("train_forward_f32", "train_backward_f32"):
        monkeypatch.setattr(numba_cpu.loops, name, recording(getattr(numba_cpu.loops, name)))
    c = BLOCKED[1]
    x = _x(BLOCKED, False, dtype=torch.float32, offset=1e3, seed=51)
    dy = _x(BLOCKED, False, dtype=torch.float32, seed=52)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    results = []
    budget = numba_cpu.loops.BLOCK_BYTES
    for run_bytes in (budget, 0):
        monkeypatch.setattr(numba_cpu, "RUN_BLOCK_BYTES", run_bytes)
        rm, rv = torch.zeros(c), torch.ones(c)
        y, stats, finite = numba_cpu.train_forward(x, w, b, rm, rv, None, 0.1, 1e-5)
        assert finite
        grads = numba_cpu.train_backward(dy, x, stats, w, b, (True, True, True))
        results.append((y, stats, rm, rv, *grads))
    assert seen == [budget, budget, 0, 0]
    for blocked, two_pass in zip(*results, strict=True):
        assert_close(two_pass, blocked, atol=1e-6, rtol=1e-5, what="outputs")


def _first_values(shape: tuple[int, ...]) -> tuple:
    """The index of the first value of every third channel in the first 16 samples."""
    return (slice(None, 16), slice(None, None, 3)) + (0,) * (len(shape) - 2)


@GEOMETRIES
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e5])
def test_blocked_training_pass_with_several_blocks_per_thread(geometry, offset, threading_mode):
    """float32 data far from zero, against the float64 reference: y, dx, dweight, dbias and the
    running statistics. The shift is taken from the first value of the first 16 samples: those
    are 1000 standard deviations off in every third channel, so those blocks sum again around
    their mean (where the geometry allows it: with one value per sample, 16 of 128 samples
    cannot put the shift 3 standard deviations away). The gradient follows x (as it does in
    training), so that the term of dx that corrects for the mean's rounding to float32
    counts."""
    c = geometry[1]
    x = _x(geometry, False, dtype=torch.float64, offset=offset, seed=13)
    x[_first_values(geometry)] += 1e3
    x = x.float().requires_grad_()
    w = (torch.rand(c) + 0.5).requires_grad_()
    b = torch.randn(c).requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.5)
    dy = _x(geometry, False, dtype=torch.float32, seed=14) + (x.detach() - offset) * 0.5
    y.backward(dy)
    y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b), eps=1e-5)
    dx_ref, dw_ref, db_ref = ref.backward(np64(dy), cache)
    rm_ref, rv_ref, _ = ref.update_running_stats(np.zeros(c), np.ones(c), cache.stats, 0.5)
    assert np.abs(np64(y) - y_ref).max() <= 1e-4
    # dx is of the order of w / std: compare with that scale
    assert np.abs(np64(x.grad) - dx_ref).max() <= 2e-5 * np.abs(dx_ref).max()
    assert_close(w.grad, dw_ref, atol=0, rtol=1e-4, what="dweight")
    assert_close(b.grad, db_ref, atol=1e-2, rtol=1e-5, what="dbias")
    assert_close(rm, rm_ref, atol=1e-6, rtol=1e-6, what="running_mean")
    assert_close(rv, rv_ref, atol=0, rtol=1e-5, what="running_var")


@GEOMETRIES
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (True, True, False)])
def test_blocked_backward_computes_what_is_asked(geometry, needs, threading_mode):
    c = geometry[1]
    x = _x(geometry, False, dtype=torch.float32, offset=3.0, seed=15)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    dy = _x(geometry, False, dtype=torch.float32, seed=16)
    _y, stats, _finite = numba_cpu.train_forward(x, w, b, None, None, None, 0.1, 1e-5)
    dx, dw, db = numba_cpu.train_backward(dy, x, stats, w, b, needs)
    _y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b), eps=1e-5)
    expected = ref.backward(np64(dy), cache)
    names = ("dx", "dw", "db")
    for got, want, need, what in zip((dx, dw, db), expected, needs, names, strict=True):
        if need:
            assert got is not None, what
            assert np.abs(np64(got) - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), what
        else:
            assert got is None, what


@GEOMETRIES
def test_blocked_forward_with_a_nonfinite_channel(geometry, threading_mode):
    """One channel holds a NaN: the batch is not finite (nothing is updated), and the other
    channels' outputs are right."""
    c = geometry[1]
    x = _x(geometry, False, dtype=torch.float32, seed=17)
    x[(5, 11) + (geometry[-1] // 2,) * (len(geometry) - 2)] = float("nan")
    rm, rv = torch.zeros(c), torch.ones(c)
    nbt = torch.zeros((), dtype=torch.int64)
    y, _stats, finite = numba_cpu.train_forward(x, None, None, rm, rv, nbt, 0.1, 1e-5)
    assert not finite
    assert torch.equal(rm, torch.zeros(c)) and torch.equal(rv, torch.ones(c)) and int(nbt) == 0
    assert bool(torch.isnan(y[:, 11]).all())
    others = [i for i in range(c) if i != 11]
    assert np.abs(np64(y[:, others]) - exact_normalize(x[:, others])).max() <= 1e-5


@pytest.mark.parametrize("geometry", [WIDE_RUNS, WIDE_NC], ids=str)
def test_four_steps_on_wide_data_match_the_fused_passes(geometry, threading_mode):
    """The four separate steps (SyncBatchNorm's, Batch Renorm's) take wide data's sums by the
    same blocks as the fused passes: the same statistics and backward sums, bit for bit, and
    the reference's."""
    c = geometry[1]
    x = _x(geometry, False, dtype=torch.float32, offset=50.0, seed=21)
    dy = _x(geometry, False, dtype=torch.float32, seed=22)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    _y, stats, _finite = numba_cpu.train_forward(x, w, b, None, None, None, 0.1, 1e-5)
    mean, var = numba_cpu.statistics(x)
    invstd = stats[c:]  # stats: the mean, then 1 / sqrt(var + eps)
    assert torch.equal(mean, stats[:c])
    # float32 data's 1 / sqrt is within two units in the last place of torch's (_inv_sqrt)
    assert_close(invstd, 1.0 / torch.sqrt(var + 1e-5), atol=0, rtol=4.5e-16, what="invstd")
    _dx, dw, db = numba_cpu.train_backward(dy, x, stats, w, b, (False, True, True))
    sum_dy, sum_dy_xmu = numba_cpu.backward_reduce(dy, x, mean)
    assert torch.equal(db, sum_dy.float()) and torch.equal(dw, (sum_dy_xmu * invstd).float())
    ref_mean = np64(x).mean(axis=tuple(i for i in range(x.dim()) if i != 1))
    assert np.abs(mean.numpy() - ref_mean).max() <= 1e-9 * 50


def test_fast_inverse_square_root_is_exact_to_float64_rounding():
    """float32 data takes 1/sqrt(var + eps) from a float32 estimate refined twice in float64:
    within two units in the last place (4.5e-16) of the correctly rounded value over the whole
    range it is used in; outside
    that range (and for float64 data) the exact division, bit for bit."""
    loops = numba_cpu.loops
    rng = np.random.default_rng(5)
    t = np.concatenate([
        10.0 ** rng.uniform(np.log10(loops.FAST_MIN), np.log10(loops.FAST_MAX), 200_000),
        [loops.FAST_MIN, loops.FAST_MAX, 1.0, 2.0, 0.5, 1e-5],
    ])  # fmt: skip
    exact = 1.0 / np.sqrt(t)
    out = np.empty_like(t)
    loops._invstd_into(t, 0.0, np.zeros(1, np.float32), out)
    assert np.abs(out / exact - 1.0).max() <= 4.5e-16
    for outside in (1e-42, 1e-35, 1e31, 1e40, np.inf, 0.0):
        some = np.append(t[:1000], outside)
        out = np.empty_like(some)
        loops._invstd_into(some, 0.0, np.zeros(1, np.float32), out)
        with np.errstate(divide="ignore"):  # 1 / sqrt(0) = inf, as the kernels give
            assert np.array_equal(out, 1.0 / np.sqrt(some))
    out = np.empty_like(t)
    loops._invstd_into(t, 0.0, np.zeros(1, np.float64), out)
    assert np.array_equal(out, exact)


@pytest.mark.parametrize("geometry", [BLOCKED, WIDE_RUNS, WIDE_NC, (6, 5, 7)], ids=str)
def test_variances_outside_the_fast_range_take_the_exact_inverse(geometry, threading_mode):
    """A constant channel with a tiny eps (var + eps = 1e-42, a float32 subnormal, where a
    float32 estimate is infinite) and a channel of values near 1e16 (var = 1e32, above
    FAST_MAX) in float32 data: the kernels take the exact 1/sqrt there, in training and in
    evaluation. (Values near 1e20 would overflow the runs family's float32 block sums: such a
    batch reports itself non-finite.)"""
    c = geometry[1]
    x = _x(geometry, False, dtype=torch.float32, seed=31)
    x[:, 1] = 3.0
    x[:, 2] = x[:, 2].sign() * 1e16
    eps = 1e-42
    _y, stats, finite = numba_cpu.train_forward(x, None, None, None, None, None, 0.1, eps)
    assert finite and bool(torch.isfinite(stats).all())
    var = torch.var(x.double().transpose(0, 1).reshape(c, -1), dim=1, correction=0)
    assert float(stats[c + 1]) == 1.0 / np.sqrt(eps)  # var = 0: exact
    # the runs family sums blocks in float32 lanes: its variance is float32-precise
    assert_close(stats[c:], 1.0 / torch.sqrt(var + eps), atol=0, rtol=1e-6, what="invstd")
    rv = var.float()
    y = numba_cpu.eval_forward(x, torch.zeros(c), rv, None, None, eps)
    shape = (1, c) + (1,) * (x.dim() - 2)
    ref_y = np64(x) / np.sqrt(np64(rv).astype(np.float64) + eps).reshape(shape)
    assert np.isfinite(np64(y)).all()
    assert_close(y, ref_y, atol=1e-6, rtol=1e-6, what="y")


@GEOMETRIES
def test_blocked_cumulative_average_and_counter(geometry, threading_mode):
    """momentum=None on the blocked passes: each thread moves its channels' running statistics
    at the rate 1/(t + 1) read before the counter advances, which happens once per batch."""
    c = geometry[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    nbt = torch.zeros(1, dtype=torch.int64)
    rm_ref, rv_ref, t = np.zeros(c), np.ones(c), 0
    for seed in range(3):
        x = _x(geometry, False, dtype=torch.float32, offset=2.0, seed=40 + seed)
        numba_cpu.train_forward(x, None, None, rm, rv, nbt, None, 1e-5)
        _y, cache = ref.forward_train(np64(x), None, None, eps=1e-5)
        rm_ref, rv_ref, t = ref.update_running_stats(rm_ref, rv_ref, cache.stats, None, t)
    assert int(nbt) == t == 3
    assert_close(rm, rm_ref, atol=1e-6, rtol=1e-6, what="running_mean")
    assert_close(rv, rv_ref, atol=0, rtol=1e-5, what="running_var")


# channel means in standard deviations, on both sides of DIRECT_MAX and far beyond it
DIRECT_OFFSETS = [0.0, 0.5, -2.0, 3.9, -3.9, 4.1, -4.1, 20.0, 1e3, -1e4, 1e4]


@pytest.mark.parametrize(
    "geometry,cl",
    [((48, 11), False), ((6, 11, 3, 3), True), ((40, 11, 5), False), ((5, 11), False)],
    ids=["columns", "channels_last", "short-runs", "wide"],
)
def test_short_runs_normalize_near_zero_without_a_shift_and_far_with_one(
    geometry, cl, threading_mode
):
    """With short runs, a channel whose mean is within DIRECT_MAX standard deviations of zero
    is normalized as ``x * s + o`` (one coefficient array fewer per value), a channel farther
    out around its rounded mean: every output keeps float32 precision whatever the offset
    (without the shift, 1e4 standard deviations would cost about 1e-3)."""
    c = geometry[1]
    shape = [1] * len(geometry)
    shape[1] = c
    offsets = torch.tensor(DIRECT_OFFSETS, dtype=torch.float64).reshape(shape)
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(geometry, generator=g, dtype=torch.float64) + offsets).float()
    x = channels_last(x) if cl else x
    dy = _x(geometry, cl, dtype=torch.float32, seed=32)
    w, b = torch.linspace(0.5, 1.5, c), torch.linspace(-1.0, 1.0, c)
    xr = x.clone().requires_grad_()
    y = batch_norm(xr, None, None, w, b, training=True)
    y.backward(dy)
    y_ref, cache = ref.forward_train(np64(x), np64(w), np64(b), eps=1e-5)
    dx_ref, _, _ = ref.backward(np64(dy), cache)
    assert np.abs(np64(y) - y_ref).max() <= 2e-6
    assert np.abs(np64(xr.grad) - dx_ref).max() <= 2e-6 * np.abs(dx_ref).max()
    # evaluation, with the batch's exact statistics as running statistics
    axes = tuple(i for i in range(x.dim()) if i != 1)
    rm = torch.tensor(np64(x).mean(axis=axes), dtype=torch.float32)
    rv = torch.tensor(np64(x).var(axis=axes), dtype=torch.float32)
    with torch.no_grad():
        y_eval = batch_norm(x, rm, rv, w, b, training=False)
    expected = ref.forward_eval(np64(x), np64(rm), np64(rv), np64(w), np64(b), 1e-5)
    assert np.abs(np64(y_eval) - expected).max() <= 2e-6


def test_direct_coefficients_drop_the_shift_only_near_zero():
    """The per-channel decision behind the direct form: with ``direct``, the shift ``k`` is 0
    where ``|mean| * invstd <= DIRECT_MAX`` and the mean rounded elsewhere; without it, always
    the mean rounded. Either way ``(x - k) * s + o`` is the same normalization."""
    loops = numba_cpu.loops
    invstd = np.array([1.0, 1.0, 1.0, 1.0, 0.01, 100.0, 2.0])
    mean = np.array([0.0, 3.9, -4.1, 1e4, 390.0, 0.05, -2.1])
    near = np.abs(mean) * invstd <= loops.DIRECT_MAX
    assert near.tolist() == [True, True, False, False, True, False, False]
    w, b = np.linspace(0.5, 1.5, 7), np.linspace(-1.0, 1.0, 7)
    like = np.zeros(1, np.float32)
    x = mean[:, None] + np.linspace(-3.0, 3.0, 5)[None, :] / invstd[:, None]
    exact = (x - mean[:, None]) * (invstd * w)[:, None] + b[:, None]
    for direct in (True, False):
        k, s, o = loops._coefficients(mean, invstd, w, b, True, True, like, direct)
        expected_k = np.where(near & direct, 0.0, mean.astype(np.float32))
        assert k.dtype == np.float32 and np.array_equal(k, expected_k)
        got = (x - k[:, None]) * s[:, None].astype(np.float64) + o[:, None]
        assert np.abs(got - exact).max() <= 1e-5
        co = loops._grad_coefficients(
            mean, invstd, w, True, np.ones(7), np.ones(7), 10, like, direct
        )
        assert np.array_equal(co[0], expected_k)
