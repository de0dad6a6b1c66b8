"""A per-channel tensor of the wrong size (a replaced parameter or buffer) is an error that names
the layer, never a read or write past its end, and the layer's state stays as it was.

The compiled kernels read one value per channel from each per-channel tensor and the training
update writes one per channel, so each layer must check the sizes on every path — the fast
path included — before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import bnorm
from bnorm.errors import BatchNormShapeError

C = 32

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "BatchNorm2d": lambda: bnorm.BatchNorm2d(C),
    "BatchRenorm2d": lambda: bnorm.BatchRenorm2d(C),
    "GhostBatchNorm2d": lambda: bnorm.GhostBatchNorm2d(C, virtual_batch_size=4),
    "FrozenBatchNorm2d": lambda: bnorm.FrozenBatchNorm2d(C),
    "BatchNormAct2d": lambda: bnorm.BatchNormAct2d(C),
    "BatchNormAct2d-memory-efficient": lambda: bnorm.BatchNormAct2d(
        C, act="leaky_relu", memory_efficient=True
    ),
    "SyncBatchNorm": lambda: bnorm.SyncBatchNorm(C),
}

# large enough for the compiled kernels' own path, small enough for the small-input path
SHAPES = [(8, C, 16, 16), (4, C, 2, 2)]


def _replace(layer: nn.Module, name: str, size: int) -> None:
    old = getattr(layer, name)
    new = torch.ones(size, dtype=old.dtype)
    setattr(layer, name, nn.Parameter(new) if isinstance(old, nn.Parameter) else new)


@pytest.mark.parametrize("shape", SHAPES, ids=["large", "small"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_wrong_size_raises_and_keeps_state(kind, name, training, grad, shape):
    layer = LAYERS[kind]().train(training)
    size = C // 2 if name.startswith("running") else C + 5  # too short and too long
    _replace(layer, name, size)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, requires_grad=grad)
    with pytest.raises(BatchNormShapeError, match=rf"{name} should contain {C} elements not"):
        layer(x)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("training", [True, False])
def test_recurrent_wrong_size_raises(training):
    layer = bnorm.RecurrentBatchNorm1d(C, max_steps=3).train(training)
    layer.weight = nn.Parameter(torch.ones(C - 1))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(BatchNormShapeError, match=r"RecurrentBatchNorm1d\(32\): weight should"):
        layer(torch.randn(8, C), 1)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("shape", SHAPES, ids=["large", "small"])
@pytest.mark.parametrize("grad", [False, True])
def test_counter_of_another_dtype_counts_as_torch_does(shape, grad):
    # momentum=None divides by the counter; the kernels advance it as one int64, so a counter
    # of another dtype takes the step-by-step path, which computes what torch computes
    ours, theirs = bnorm.BatchNorm2d(C, momentum=None), nn.BatchNorm2d(C, momentum=None)
    for layer in (ours, theirs):
        layer.num_batches_tracked = torch.zeros((), dtype=torch.int32)
    for step in range(3):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step)) * 3 + 1
        x.requires_grad_(grad)
        ours(x)
        theirs(x)
    assert ours.num_batches_tracked.dtype == torch.int32
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
