"""The pure parts of bnorm.distributed: the exact merge, shards, loss scale, init from env."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

from bnorm import distributed as bd


@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
    offset=st.sampled_from([0.0, 1e4, -3e6]),
    seed=st.integers(0, 2**16),
)
def test_merge_is_the_statistics_of_the_concatenation(sizes, offset, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(offset, 2.0, size=(n, 3)) for n in sizes]
    counts = torch.tensor([float(n) for n in sizes])
    # an empty part may carry any placeholder (even non-finite): it must get weight 0
    means = torch.tensor(np.stack([p.mean(0) if len(p) else np.full(3, np.inf) for p in parts]))
    m2s = torch.tensor(
        np.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else np.full(3, np.nan) for p in parts])
    )
    mean, var, count = bd.merge_statistics(counts, means, m2s)
    whole = np.concatenate(parts)
    assert count == len(whole)
    assert_close(mean, whole.mean(0), atol=1e-9 * (1 + abs(offset)), what="mean")
    assert_close(var, whole.var(0), atol=1e-8, rtol=1e-9, what="var")


def test_merge_of_nothing_is_finite():
    mean, var, count = bd.merge_statistics(torch.zeros(2), torch.zeros(2, 4), torch.zeros(2, 4))
    assert count == 0 and torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.ones(4))


@given(n=st.integers(0, 50), parts=st.integers(1, 8))
def test_shards_cover_the_batch_in_order(n, parts):
    bounds = [bd.shard_bounds(n, parts, i) for i in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_trivial(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert bd.init_from_env() is False
    assert bd.rank() == 0 and bd.world_size() == 1 and bd.is_main_process()
    x = torch.arange(5)
    assert bd.shard(x) is x or torch.equal(bd.shard(x), x)
    model = torch.nn.Linear(2, 2)
    assert bd.prepare_model(model) is model and bd.unwrap(model) is model
    assert bd.global_mean_loss_scale(4, 32) == 1 / 32
    with pytest.raises(ValueError, match="local_size"):
        bd.global_mean_loss_scale(33, 32)


def test_process_group_from_env_leaves_alone_a_group_it_did_not_make(monkeypatch, tmp_path):
    """Without torchrun the block runs single-process; inside a group the caller made, it runs
    distributed and the group survives it (only a group the helper made is destroyed)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with bd.process_group_from_env() as distributed:
        assert distributed is False
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with bd.process_group_from_env() as distributed:
            assert distributed is True
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
