"""SyncBatchNorm in one process: local fallback, state, conversion, checks.

The synchronized behaviour over several processes is tested in tests/test_distributed.py.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from helpers import SHAPES, assert_close, channels_last, is_channels_last
from torch import nn

import bnorm
from bnorm.errors import BatchNormShapeError


def _pair(c: int, **kwargs) -> tuple[bnorm.SyncBatchNorm, nn.BatchNorm1d]:
    sync = bnorm.SyncBatchNorm(c, **kwargs)
    plain = nn.BatchNorm1d(c, **kwargs)
    with torch.no_grad():
        for p in (sync.weight, plain.weight):
            p.copy_(torch.linspace(0.5, 2.0, c))
    return sync, plain


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [*SHAPES.values(), (2, 3, 2, 2, 2, 2)], ids=str)
def test_without_distributed_it_is_local_batch_norm(shape, momentum):
    """Not initialized: torch's BatchNorm over the same values, for any rank >= 2."""
    assert not dist.is_initialized()
    c = shape[1]
    sync, plain = _pair(c, momentum=momentum)
    for step in range(2):
        x = (torch.randn(shape) * 3 + step).requires_grad_(True)
        x_plain = x.detach().reshape(shape[0], c, -1).requires_grad_(True)
        y, y_plain = sync(x), plain(x_plain)
        dy = torch.randn(shape)
        y.backward(dy)
        y_plain.backward(dy.reshape(y_plain.shape))
        assert_close(y, y_plain.reshape(shape), 1e-5, what="output")
        assert_close(x.grad, x_plain.grad.reshape(shape), 1e-5, what="input grad")
    assert_close(sync.weight.grad, plain.weight.grad, 1e-4, what="weight grad")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(sync, name), getattr(plain, name), 1e-6, what=name)
    sync.eval()
    plain.eval()
    x = torch.randn(shape)
    assert_close(sync(x), plain(x.reshape(shape[0], c, -1)).reshape(shape), 1e-5, what="eval")


def test_channels_last_is_kept():
    x = channels_last(torch.randn(2, 3, 4, 5))
    assert is_channels_last(bnorm.SyncBatchNorm(3)(x))


def test_state_dict_matches_torch_sync_batch_norm_both_ways():
    ours, theirs = bnorm.SyncBatchNorm(5), nn.SyncBatchNorm(5)
    with torch.no_grad():
        theirs.running_mean.uniform_()
        theirs.weight.uniform_()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    theirs.load_state_dict(bnorm.SyncBatchNorm(5).state_dict())
    # not torch's class on purpose: DDP refuses CPU models holding torch.nn.SyncBatchNorm
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, nn.SyncBatchNorm)


def test_convert_keeps_state_and_leaves_other_layers_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.Sequential(bnorm.BatchNorm2d(4, on_nonfinite="raise"), nn.SyncBatchNorm(4)),
        nn.InstanceNorm2d(4),
        nn.BatchNorm3d(2, affine=False, momentum=None),
    )
    model[1].eval()
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    group = object()  # any handle is stored as given
    out = bnorm.convert_sync_batchnorm(model, process_group=group, timeout=3)
    assert out is model
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("SyncBatchNorm") == 4 and "InstanceNorm2d" in kinds
    for key, value in model.state_dict(keep_vars=True).items():
        assert value is tensors[key], key  # the same tensors: optimizers keep working
    assert not model[1].training and model[2][0].training
    assert model[2][0].on_nonfinite == "raise" and model[1].on_nonfinite == "warn"
    assert model[4].momentum is None and model[4].weight is None
    for layer in (model[1], model[2][0], model[2][1], model[4]):
        assert layer.process_group is group
        assert layer.timeout == datetime.timedelta(seconds=3)
    assert len({layer.sync_id for layer in (model[1], model[2][0], model[2][1])}) == 3
    single = bnorm.convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert isinstance(single, bnorm.SyncBatchNorm)


def test_bad_calls_raise_clear_errors_and_change_nothing():
    layer = bnorm.SyncBatchNorm(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\): expected at least 2D input"):
        layer(torch.randn(3))
    with pytest.raises(BatchNormShapeError, match=r"SyncBatchNorm\(3\): expected 3 channels"):
        layer(torch.randn(4, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="timeout must be positive"):
        bnorm.SyncBatchNorm(3, timeout=0)
    with pytest.raises(TypeError, match=r"convert_sync_batchnorm: expected a torch\.nn\.Module"):
        bnorm.convert_sync_batchnorm("model")
    assert "timeout=2.5s" in repr(bnorm.SyncBatchNorm(3, timeout=2.5))


@pytest.fixture
def world_of_one(tmp_path):
    """A real gloo process group with a single process (FileStore: no port needed)."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_of_one_falls_back_where_torch_refuses_cpu(world_of_one):
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        nn.SyncBatchNorm(3)(x)  # torch's, on CPU
    ours, plain = _pair(3)
    assert_close(ours(x), plain(x), 1e-6, what="world of one")
    assert ours._sync_calls == 0  # no collective was needed
    model = bnorm.distributed.prepare_model(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    assert isinstance(bnorm.distributed.unwrap(model)[1], bnorm.SyncBatchNorm)
    model(x).sum().backward()
    assert torch.equal(bnorm.distributed.shard(x), x)
    assert bnorm.distributed.is_main_process() and bnorm.distributed.init_from_env()
