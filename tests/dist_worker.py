"""One rank of a multi-process SyncBatchNorm test.

Run as ``python dist_worker.py SCENARIO RANK WORLD DIR``.

Launched by tests/test_distributed.py (one process per rank, bounded by timeouts there). Every
rank builds the same global batches from fixed seeds, keeps its own slice, runs the scenario and
writes what it computed to ``DIR/rank{RANK}.pt``; the parent compares against single-process
batch norm over the concatenated batch. Ranks meet through a FileStore in DIR (no port).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import bnorm
from bnorm import distributed as bd

# (name, channels, trailing dims, per-rank sizes by world size, channels_last, momentum)
CASES = [
    ("NC", 4, (), {2: [5, 5], 3: [4, 4, 4]}, False, 0.1),
    ("NCHW", 3, (4, 5), {2: [2, 2], 3: [2, 2, 2]}, False, 0.1),
    ("NCHW-channels_last", 3, (3, 4), {2: [2, 3], 3: [3, 1, 2]}, True, 0.1),
    ("uneven-NC", 4, (), {2: [1, 7], 3: [1, 7, 3]}, False, None),
    ("empty-rank-NCL", 3, (5,), {2: [0, 4], 3: [3, 0, 4]}, False, 0.3),
    ("offset-1e4-NC", 4, (), {2: [6, 3], 3: [2, 5, 3]}, False, 0.1),
]
# data far from zero: float32 values around 1e4 with spread 2 (a naive E[x²]-E[x]² loses it)
OFFSETS = {"offset-1e4-NC": 1e4}
STEPS = 2


def case_data(name: str, channels: int, trailing: tuple[int, ...], total: int, step: int):
    """The global batch and upstream gradient of one step (same on every rank and the parent)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    shape = (total, channels, *trailing)
    x = torch.randn(shape, generator=g) * 2.0 + 3.0 + OFFSETS.get(name, 0.0)
    dy = torch.randn(shape, generator=g)
    return x, dy


def case_params(channels: int):
    g = torch.Generator().manual_seed(7)
    weight = torch.rand(channels, generator=g) + 0.5
    bias = torch.randn(channels, generator=g)
    running_mean = torch.randn(channels, generator=g)
    running_var = torch.rand(channels, generator=g) + 0.5
    return weight, bias, running_mean, running_var


def _slice(t: torch.Tensor, sizes: list[int], index: int) -> torch.Tensor:
    start = sum(sizes[:index])
    return t[start : start + sizes[index]]


def run_case(layer: bnorm.SyncBatchNorm, name, channels, trailing, sizes, cl, me):
    out = []
    for step in range(STEPS):
        x, dy = case_data(name, channels, trailing, sum(sizes), step)
        x, dy = _slice(x, sizes, me).clone(), _slice(dy, sizes, me)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        (y * dy).sum().backward()
        out.append(
            {
                "y": y.detach().clone(),
                "channels_last": y.is_contiguous(memory_format=torch.channels_last),
                "dx": x.grad.clone(),
                "dweight": layer.weight.grad.clone(),
                "dbias": layer.bias.grad.clone(),
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "nbt": int(layer.num_batches_tracked),
            }
        )
    return out


def new_layer(channels, momentum, group=None) -> bnorm.SyncBatchNorm:
    weight, bias, rm, rv = case_params(channels)
    layer = bnorm.SyncBatchNorm(channels, momentum=momentum, process_group=group, timeout=60)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
    return layer


def train_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 8), bnorm.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5), nn.BatchNorm1d(5)
    )


def train_batch(total: int = 32):
    g = torch.Generator().manual_seed(11)
    return torch.randn(total, 3, generator=g) + 1.0, torch.randn(total, 5, generator=g)


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, total: int) -> None:
    """One SGD step whose loss is the global-batch mean, the helpers' recipe."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad()
    loss = ((model(x) - target) ** 2).sum() * bd.global_mean_loss_scale(len(x), total)
    loss.backward()
    optimizer.step()


def scenario_exact(me: int, world: int) -> dict:
    results: dict = {}
    for name, channels, trailing, sizes, cl, momentum in CASES:
        layer = new_layer(channels, momentum)
        results[name] = run_case(layer, name, channels, trailing, sizes[world], cl, me)
    if world == 3:
        # ranks 0 and 1 share statistics; rank 2 is outside the group and computes locally.
        group = dist.new_group([0, 1])
        layer = new_layer(4, 0.1, group)
        results["subgroup"] = run_case(layer, "subgroup", 4, (), [3, 5, 4], False, me)
    # NaN on one rank: the global statistics are non-finite, so no rank updates.
    layer = new_layer(2, 0.1)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(3, 2)
    if me == world - 1:
        x[1, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
    results["nonfinite"] = {
        "warned": any(issubclass(w.category, bnorm.NonFiniteBatchWarning) for w in caught),
        "unchanged": torch.equal(before[0], layer.running_mean)
        and torch.equal(before[1], layer.running_var),
        "nbt": int(layer.num_batches_tracked),
    }
    # An empty global batch: empty outputs, statistics unchanged, counted in nbt (as torch).
    layer = new_layer(3, 0.1)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    y = layer(torch.empty(0, 3, 2))
    results["all-empty"] = {
        "shape": tuple(y.shape),
        "unchanged": torch.equal(before[0], layer.running_mean)
        and torch.equal(before[1], layer.running_var),
        "nbt": int(layer.num_batches_tracked),
    }
    # One value per channel over the whole group is an error on every rank, state unchanged.
    layer = new_layer(3, 0.1)
    try:
        layer(torch.randn(1 if me == 0 else 0, 3))
    except ValueError as err:
        results["one-value"] = {"error": str(err), "nbt": int(layer.num_batches_tracked)}
    else:
        results["one-value"] = {"error": None}
    # A data-parallel training step: DDP + SyncBatchNorm on shards of a global batch of 32.
    model = bd.prepare_model(train_model())
    x, target = train_batch()
    train_step(model, bd.shard(x), bd.shard(target), len(x))
    results["train_step"] = {k: v.clone() for k, v in bd.unwrap(model).state_dict().items()}
    results["converted"] = sorted({type(m).__name__ for m in bd.unwrap(model).modules()})
    return results


FAULT_TIMEOUT = 2.0  # seconds: every SyncBatchNorm of the fault scenarios


def _fault_model() -> nn.Sequential:
    """Two SyncBatchNorm layers of different widths (a skipped layer then pairs collectives of
    different sizes, which gloo cannot survive without the in-step check)."""
    return nn.Sequential(
        bnorm.SyncBatchNorm(3, timeout=FAULT_TIMEOUT),
        nn.Linear(3, 5),
        bnorm.SyncBatchNorm(5, timeout=FAULT_TIMEOUT),
    )


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


def _same(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, _stats(model), strict=True))


def _wait_for_rank0(folder: Path) -> None:
    deadline = time.monotonic() + 90
    while not (folder / "rank0.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # until rank 0 has given up, recovered and saved what it saw


def _faulty_step(
    model: nn.Sequential, extra: nn.Module, x: torch.Tensor, kind: str, folder: Path
) -> None:
    """Step 2 on the faulty rank."""
    if kind == "die":
        sys.stdout.flush()
        os._exit(0)  # dies without a word, as a killed process would
    if kind == "skip":  # skips the first layer: its next call is the second, of width 5
        model[2](model[1](x))
    elif kind == "extra":  # calls a layer the other rank does not, then the model
        extra(torch.randn(4, 4))
        model(x)
    elif kind == "width":  # the same layer and call, but 4 channels instead of 3
        wide = bnorm.SyncBatchNorm(4, timeout=FAULT_TIMEOUT)
        wide.sync_id, wide._sync_calls = model[0].sync_id, model[0]._sync_calls
        wide(torch.randn(4, 4))
    elif kind == "late":  # arrives after the others have given up (and left)
        _wait_for_rank0(folder)
        model(x)
    elif kind == "grad-mismatch":  # would not run the backward, the other rank would
        with torch.no_grad():
            model(x)
    else:
        raise ValueError(kind)


def scenario_fault(me: int, world: int, kind: str, folder: Path) -> dict:
    """Step 1 runs normally; in step 2 the last rank faults (see :func:`_faulty_step`). Every
    rank that survives records whether it raised SyncBatchNormError, the message, whether its
    running statistics stayed unchanged, and the monotonic times of the step's start, of the
    error and of the end of the recovery (``destroy_process_group``)."""
    model = _fault_model()
    extra = bnorm.SyncBatchNorm(4, timeout=FAULT_TIMEOUT)  # created on every rank
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(me))
    # Step 1 with a long timeout: a first call may compile kernels for seconds on one rank.
    for layer in (*model.modules(), extra):
        if isinstance(layer, bnorm.SyncBatchNorm):
            layer.timeout = datetime.timedelta(seconds=60)
    model(x).sum().backward()
    extra(torch.randn(4, 4)).sum().backward()
    for layer in (*model.modules(), extra):
        if isinstance(layer, bnorm.SyncBatchNorm):
            layer.timeout = datetime.timedelta(seconds=FAULT_TIMEOUT)
    before = _stats(model)
    faulty = me == world - 1
    result: dict = {"error": None, "t_fault": time.monotonic()}
    try:
        if kind == "no-backward":
            y = model(x)  # the forward succeeds on both ranks ...
            if faulty:  # ... but this rank never runs the backward
                _wait_for_rank0(folder)
            else:
                y.sum().backward()
        elif faulty:
            _faulty_step(model, extra, x, kind, folder)
        else:
            model(x).sum().backward()
    except bnorm.SyncBatchNormError as err:
        result["error"] = str(err)
    result["t_error"] = time.monotonic()
    result["unchanged"] = kind == "no-backward" or _same(model, before)
    return result


def main() -> None:
    scenario, me, world, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(folder) / 'store'}",
        rank=me,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    if scenario == "exact":
        result = scenario_exact(me, world)
        torch.save(result, Path(folder) / f"rank{me}.pt")
        dist.barrier()
        dist.destroy_process_group()
        return
    result = scenario_fault(me, world, scenario, Path(folder))
    # The documented recovery after a SyncBatchNormError, then a normal interpreter exit: the
    # parent times both (bnorm.SyncBatchNormError's docstring).
    dist.destroy_process_group()
    result["t_recovered"] = time.monotonic()
    torch.save(result, Path(folder) / f"rank{me}.pt")


if __name__ == "__main__":
    main()
