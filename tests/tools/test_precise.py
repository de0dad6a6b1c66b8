"""bnorm.precise_bn: exact merged statistics of each layer's inputs, nothing else changed."""

import copy

import numpy as np
import pytest
import torch
from helpers import assert_close, np64
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnorm
from bnorm import reference as ref
from bnorm.tools.precise import MergedStats


class Counter(nn.Module):
    """A module with a buffer its forward changes: precise_bn must put it back."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x


def _model():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        bnorm.BatchNorm2d(3, momentum=None),
        Counter(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        bnorm.BatchRenorm1d(5, r_max=2.0, d_max=1.0),
        bnorm.GhostBatchNorm1d(5, 3),
        nn.Linear(5, 4),
        nn.BatchNorm1d(4, affine=False),
    )


def _batches():
    # unequal batch sizes and shifted means: where averaging per-batch variances goes wrong
    sizes, shifts = [8, 3, 12, 5], [0.0, 3.0, -2.0, 6.0]
    return [
        torch.randn(n, 2, 4, 4) * (1 + i) + s
        for i, (n, s) in enumerate(zip(sizes, shifts, strict=True))
    ]


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _inputs_seen(model, batches):
    """Each BN layer's inputs, batch by batch, in a train-mode pass of a copy of the model."""
    twin = copy.deepcopy(model).train()
    for m in _bn_layers(twin):
        m.momentum = 0.0
    seen = {i: [] for i in range(len(_bn_layers(twin)))}
    for i, m in enumerate(_bn_layers(twin)):
        m.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(np64(args[0])))
    with torch.no_grad():
        for x in batches:
            twin(x)
    return seen


def _channel_stats(parts):
    a = np.concatenate(parts, axis=0)
    axes = tuple(i for i in range(a.ndim) if i != 1)
    return a.mean(axis=axes), a.var(axis=axes, ddof=1)


def test_statistics_are_those_of_the_concatenated_inputs():
    model = _model()
    model(torch.randn(8, 2, 4, 4))  # move the running statistics and the counters
    model.eval()
    batches = _batches()
    seen = _inputs_seen(model, batches)
    bnorm.precise_bn(model, batches)
    for i, m in enumerate(_bn_layers(model)):
        mean, var = _channel_stats(seen[i])
        assert_close(m.running_mean, mean, atol=1e-6, rtol=1e-6, what=f"mean of layer {i}")
        assert_close(m.running_var, var, atol=1e-6, rtol=1e-6, what=f"var of layer {i}")
        # not the average of per-batch variances, which these batches make visibly different
        averaged = np.mean([_channel_stats([p])[1] for p in seen[i]], axis=0)
        assert np.abs(averaged - var).max() > 1e-2 * np.abs(var).max()


def test_known_data_exact_in_float64():
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    rng = np.random.default_rng(0)
    data = [rng.normal(loc=1e4 * k, scale=1 + k, size=(n, 3)) for k, n in enumerate([2, 9, 4])]
    bnorm.precise_bn(bn, [torch.from_numpy(d) for d in data])
    merged = ref.merge_stats([ref.batch_stats(d, axis=1) for d in data])
    assert_close(bn.running_mean, merged.mean, atol=0, rtol=1e-12)
    assert_close(bn.running_var, merged.var * merged.count / (merged.count - 1), atol=0, rtol=1e-10)


def test_everything_else_is_restored():
    model = _model()
    model(torch.randn(8, 2, 4, 4))
    model.eval()
    model[3].train()  # a mixed mode must come back module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    momenta = [m.momentum for m in _bn_layers(model)]
    bnorm.precise_bn(model, _batches())
    assert [m.training for m in model.modules()] == modes
    assert [m.momentum for m in _bn_layers(model)] == momenta
    after = model.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == buffers
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {
        f"{i}.{s}" for i in (1, 3, 7, 8, 10) for s in ("running_mean", "running_var")
    }


def test_num_batches_and_tuple_batches():
    batches = _batches()
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    bnorm.precise_bn(a, [(x, torch.zeros(len(x))) for x in batches], num_batches=2)
    bnorm.precise_bn(b, batches[:2])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_merged_stats_match_reference_merge():
    parts = [torch.randn(n, 2, 3, dtype=torch.float64) + n for n in (1, 4, 2)]
    acc = MergedStats()
    for p in parts:
        acc.add(p)
    merged = ref.merge_stats([ref.batch_stats(np64(p), axis=1) for p in parts])
    assert acc.count == merged.count
    assert_close(acc.mean, merged.mean, atol=1e-13, rtol=1e-13)
    assert_close(acc.m2 / acc.count, merged.var, atol=1e-13, rtol=1e-12)


def test_errors_and_starved_layers():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        bnorm.precise_bn(nn.Linear(2, 2), [torch.randn(3, 2)])
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        bnorm.precise_bn(nn.BatchNorm1d(2), [torch.randn(3, 2)], num_batches=0)
    with pytest.raises(ValueError, match="yielded no batch"):
        bnorm.precise_bn(nn.BatchNorm1d(2), [])
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        bnorm.precise_bn("model", [])

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    model = Skips()
    with pytest.warns(UserWarning, match=r"keep their running statistics: BatchNorm1d\(2\)"):
        bnorm.precise_bn(model, [torch.randn(3, 2) + 5])
    assert torch.equal(model.unused.running_mean, torch.zeros(2))
    assert model.used.running_mean.min() > 3


@given(
    sizes=st.lists(st.integers(2, 6), min_size=1, max_size=4),  # training batches: N >= 2
    spatial=st.sampled_from([(), (3,), (2, 2)]),
    offset=st.sampled_from([0.0, 1e4]),
)
def test_hypothesis_merged_statistics_equal_direct_ones(sizes, spatial, offset):
    layer = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[len(spatial)]
    bn = layer(2, dtype=torch.float64)
    batches = [torch.randn(n, 2, *spatial, dtype=torch.float64) * (i + 1) + offset * i
               for i, n in enumerate(sizes)]  # fmt: skip
    bnorm.precise_bn(bn, batches)
    mean, var = _channel_stats([np64(b) for b in batches])
    assert_close(bn.running_mean, mean, atol=1e-9, rtol=1e-12)
    assert_close(bn.running_var, var, atol=1e-9, rtol=1e-9)


def test_state_is_restored_when_a_batch_fails():
    model = _model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        bnorm.precise_bn(model, [torch.randn(6, 2, 4, 4), torch.randn(6, 5)])  # 2nd: bad shape
    assert not any(m.training for m in model.modules())
    assert [m.momentum for m in _bn_layers(model)] == [0.1, None, 0.1, 0.1, 0.1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
