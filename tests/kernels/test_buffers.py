"""The output buffer cache (bnorm/kernels/buffers.py): reuse only when nothing can reach a buffer,
the layouts the kernels write, the cap, and the public switches."""

import gc
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import channels_last

import bnorm
from bnorm.kernels import buffers

BIG = (256, 1024)  # 1 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test starts from an empty cache with the default cap, and leaves it so."""
    before = buffers._cache.max_bytes
    bnorm.set_buffer_cache(1 << 30)
    yield
    bnorm.set_buffer_cache(before)


def test_a_released_buffer_is_reused():
    x = torch.empty(BIG)
    before = bnorm.buffer_cache_info()
    a = buffers.empty_like(x)
    ptr = a.data_ptr()
    del a
    b = buffers.empty_like(x)
    assert b.data_ptr() == ptr
    info = bnorm.buffer_cache_info()
    assert (info.hits - before.hits, info.misses - before.misses) == (1, 1)


def test_a_buffer_reachable_through_a_view_is_not_reused():
    x = torch.empty(BIG)
    a = buffers.empty_like(x)
    a.fill_(3.0)
    view = a[10:20, 5:]
    ptr = a.data_ptr()
    del a
    b = buffers.empty_like(x)
    assert b.data_ptr() != ptr
    b.fill_(-1.0)
    assert bool((view == 3.0).all())  # the view's memory was not handed out again
    del view
    gc.collect()
    c = buffers.empty_like(x)
    assert c.data_ptr() == ptr


def test_a_buffer_saved_by_autograd_is_not_reused():
    """A layer's output that a later op saved for its backward must survive until then."""
    layer = bnorm.BatchNorm1d(BIG[1], track_running_stats=False)
    x = torch.randn(BIG, requires_grad=True)
    (expected,) = torch.autograd.grad((layer(x) * layer(x)).sum(), x)
    y = layer(x)
    z = (y * y).sum()  # mul saves y for its backward
    ptr = y.data_ptr()
    del y
    with torch.no_grad():  # new outputs, overwritten, while y is only reachable by autograd
        others = [layer(torch.randn(BIG)).fill_(7.0) for _ in range(3)]
    assert all(o.data_ptr() != ptr for o in others)
    (grad,) = torch.autograd.grad(z, x)
    assert torch.equal(grad, expected)


def test_outputs_kept_across_steps_are_not_overwritten():
    layer = bnorm.BatchNorm2d(16)
    kept = []
    for step in range(4):
        x = torch.randn(64, 16, 16, 16) + step
        y = layer(x)
        kept.append((y, y.detach().clone()))
    for y, copy in kept:
        assert torch.equal(y, copy)
    assert len({y.data_ptr() for y, _ in kept}) == 4


@pytest.mark.parametrize("shape", [(64, 16, 16, 16), (8, 16, 8, 8, 8)])
def test_channels_last_layouts(shape):
    x = channels_last(torch.empty(shape))
    y = buffers.empty_like(x)
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
    assert y.data_ptr() % 64 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contiguous_layout_dtype_and_alignment(dtype):
    x = torch.empty(BIG, dtype=dtype)
    y = buffers.empty_like(x)
    assert y.shape == x.shape and y.is_contiguous() and y.dtype == dtype
    assert y.data_ptr() % 64 == 0


def test_small_outputs_come_from_torch():
    x = torch.empty(8, 8)
    before = bnorm.buffer_cache_info()
    y = buffers.empty_like(x)
    assert y.shape == x.shape
    after = bnorm.buffer_cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)


def test_cap_zero_turns_the_cache_off():
    bnorm.set_buffer_cache(0)
    before = bnorm.buffer_cache_info()
    x = torch.empty(BIG)
    a = buffers.empty_like(x)
    del a
    buffers.empty_like(x)
    info = bnorm.buffer_cache_info()
    assert info.max_bytes == 0 and info.cached_bytes == 0 and info.hits == before.hits


def test_cap_bounds_the_memory_kept():
    nbytes = BIG[0] * BIG[1] * 4
    bnorm.set_buffer_cache(nbytes)  # room for exactly one idle buffer
    x = torch.empty(BIG)
    a, b = buffers.empty_like(x), buffers.empty_like(x)
    del a, b
    assert bnorm.buffer_cache_info().cached_bytes == nbytes


def test_empty_buffer_cache_frees_idle_buffers_only():
    x = torch.empty(BIG)
    kept = buffers.empty_like(x)
    idle = buffers.empty_like(x)
    del idle
    assert bnorm.buffer_cache_info().cached_bytes > 0
    bnorm.empty_buffer_cache()
    info = bnorm.buffer_cache_info()
    # (buffers of earlier tests may still be in use until the garbage collector runs)
    assert info.cached_bytes == 0 and info.in_use_bytes >= kept.numel() * 4
    again = buffers.empty_like(x)  # nothing idle is left: a new buffer, not kept's
    assert bnorm.buffer_cache_info().misses == info.misses + 1
    assert again.data_ptr() != kept.data_ptr()


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True])
def test_set_buffer_cache_refuses_bad_sizes(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        bnorm.set_buffer_cache(bad)


def test_environment_variable_sets_the_cap():
    code = "import bnorm; print(bnorm.buffer_cache_info().max_bytes)"
    env = {"BNORM_BUFFER_CACHE_MB": "3", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == str(3 * 2**20)
    env["BNORM_BUFFER_CACHE_MB"] = "lots"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "BNORM_BUFFER_CACHE_MB" in done.stderr


def test_layer_results_are_the_same_with_and_without_the_cache():
    x = torch.randn(128, 32, 8, 8, requires_grad=True)
    results = []
    for cap in (1 << 30, 0):
        bnorm.set_buffer_cache(cap)
        layer = bnorm.BatchNorm2d(32)
        x.grad = None
        y = layer(x)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad.clone(), layer.running_var.clone()))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_the_documented_limit_resize_beyond_the_buffer_raises():
    y = buffers.empty_like(torch.empty(BIG))
    with pytest.raises(RuntimeError, match="not resizable"):
        y.resize_(2 * BIG[0], BIG[1])
    y.resize_(10, 10)  # within the buffer it works, as for any tensor
    assert y.shape == (10, 10)


@pytest.mark.parametrize(
    "hold",
    [
        lambda y: y.untyped_storage(),  # a storage object alone
        lambda y: y.numpy(),  # a NumPy array over the tensor
        lambda y: torch.empty(0).set_(y.untyped_storage()),  # another tensor on its storage
        lambda y: y.detach(),
    ],
    ids=["storage", "numpy", "set_", "detach"],
)
def test_a_buffer_reachable_any_other_way_is_not_reused(hold):
    x = torch.empty(BIG)
    y = buffers.empty_like(x)
    ptr = y.data_ptr()
    keep = hold(y)
    del y
    assert buffers.empty_like(x).data_ptr() != ptr
    del keep
    gc.collect()
    assert buffers.empty_like(x).data_ptr() == ptr


def test_the_cap_counts_buffers_in_use():
    nbytes = BIG[0] * BIG[1] * 4
    bnorm.set_buffer_cache(2 * nbytes)
    x = torch.empty(BIG)
    misses = bnorm.buffer_cache_info().misses
    kept = [buffers.empty_like(x) for _ in range(3)]  # the third is beyond the cap
    info = bnorm.buffer_cache_info()
    assert (info.in_use_bytes, info.cached_bytes, info.misses - misses) == (2 * nbytes, 0, 3)
    third = kept.pop()
    del third  # a torch.empty output: nothing comes back to the cache
    assert bnorm.buffer_cache_info().cached_bytes == 0
    kept.pop()
    assert bnorm.buffer_cache_info().cached_bytes == nbytes


def test_idle_buffers_of_other_layouts_make_room_under_the_cap():
    nbytes = BIG[0] * BIG[1] * 4
    bnorm.set_buffer_cache(nbytes)
    a = buffers.empty_like(torch.empty(BIG))
    del a  # idle, but of another shape than what comes next
    b = buffers.empty_like(torch.empty(BIG[1], BIG[0]))
    info = bnorm.buffer_cache_info()
    assert (info.in_use_bytes, info.cached_bytes) == (nbytes, 0)
    assert b.shape == (BIG[1], BIG[0])


def test_set_buffer_cache_leaves_buffers_in_use_to_their_tensors():
    x = torch.empty(BIG)
    y = buffers.empty_like(x).fill_(2.0)
    bnorm.set_buffer_cache(1 << 30)
    assert bnorm.buffer_cache_info().in_use_bytes == 0  # no longer the cache's
    z = buffers.empty_like(x).fill_(3.0)
    assert z.data_ptr() != y.data_ptr() and bool((y == 2.0).all())


class _YieldingCount(int):
    """An int that lets other threads run whenever it is compared: in place of the idle count,
    it opens the window between seeing a buffer idle and taking it as wide as it can be."""

    def __eq__(self, other: object) -> bool:
        time.sleep(0)
        return int(self) == other

    __hash__ = int.__hash__


def test_two_threads_never_get_the_same_buffer(monkeypatch):
    """The reuse test takes no lock (see empty_like): threads racing for the same idle buffer
    must each end up with memory of its own."""
    monkeypatch.setattr(buffers, "_IDLE_REFS", _YieldingCount(buffers._IDLE_REFS))
    x = torch.empty(BIG)
    errors = []

    def work(value: float) -> None:
        for _ in range(200):
            y = buffers.empty_like(x)
            y[0, :8] = value
            time.sleep(0)  # the other threads take their turn
            if not bool((y[0, :8] == value).all()):
                errors.append(value)
            del y

    threads = [threading.Thread(target=work, args=(float(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_dimensional_buffers_for_per_channel_results(dtype):
    """buffers.empty (the saved statistics, the parameters' gradients of very wide inputs):
    a CPU tensor of n values, reused once released, from torch below MIN_BYTES, and from
    torch (on the CPU, not the meta device the cache's lookup uses) when the cache is off."""
    n = buffers.MIN_BYTES  # as many values as MIN_BYTES bytes: above it in either dtype
    a = buffers.empty(n, dtype)
    assert a.shape == (n,) and a.dtype is dtype and a.device.type == "cpu"
    ptr = a.data_ptr()
    del a
    before = bnorm.buffer_cache_info()
    b = buffers.empty(n, dtype)
    assert b.data_ptr() == ptr and bnorm.buffer_cache_info().hits == before.hits + 1
    small = buffers.empty(16, dtype)
    assert small.shape == (16,) and bnorm.buffer_cache_info().misses == before.misses
    bnorm.set_buffer_cache(0)
    off = buffers.empty(n, dtype)
    assert off.device.type == "cpu" and off.shape == (n,) and off.dtype is dtype
