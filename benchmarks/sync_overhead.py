"""Per-step cost of SyncBatchNorm vs local BatchNorm in data-parallel training on CPU (gloo).

Usage: ``python benchmarks/sync_overhead.py [--steps 200] [--csv PATH]``

Starts 2 processes (gloo over 127.0.0.1, rendezvous through a FileStore in a temporary folder,
one intra-op thread each). Each builds two copies of the same small model, both wrapped in
DistributedDataParallel: one with bnorm.SyncBatchNorm (via bnorm.distributed.prepare_model),
one with local bnorm BatchNorm. It then alternates one training step (forward, backward,
SGD step) of each model on the same shard, timing each step between barriers, and rank 0
reports the medians and the median of the step-by-step ratios sync/local. Both models pay
DDP's gradient all-reduce; the difference is SyncBatchNorm's two collectives per layer.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnorm
from bnorm import distributed as bd

WORLD = 2


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256),
        bnorm.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 256),
        bnorm.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        bnorm.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        bnorm.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# name, model, per-rank input shape (global batch = 2x)
CONFIGS = [
    ("MLP 64-256-256-10, 2 BN, batch 2x32", mlp, (32, 64)),
    ("CNN 2 conv 3x3 on 3x32x32, 2 BN, batch 2x16", cnn, (16, 3, 32, 32)),
]


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _timed(model, opt, x, y) -> float:
    dist.barrier()  # both ranks start together, so a step's time is not the other's lag
    start = time.perf_counter()
    _step(model, opt, x, y)
    return time.perf_counter() - start


def worker(rank: int, folder: str, steps: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(folder) / 'store'}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    rows = []
    for name, build, shape in CONFIGS:
        torch.manual_seed(0)
        synced = bd.prepare_model(build())
        torch.manual_seed(0)
        local = nn.parallel.DistributedDataParallel(build())
        opts = {
            "sync": torch.optim.SGD(synced.parameters(), lr=0.01),
            "local": torch.optim.SGD(local.parameters(), lr=0.01),
        }
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=gen)
        y = torch.randint(0, 10, (shape[0],), generator=gen)
        for _ in range(10):  # warm-up
            _timed(synced, opts["sync"], x, y)
            _timed(local, opts["local"], x, y)
        times: dict[str, list[float]] = {"sync": [], "local": []}
        for i in range(steps):
            # alternate which goes first, so drifts in machine load hit both alike
            order = ("sync", "local") if i % 2 == 0 else ("local", "sync")
            for kind in order:
                model = synced if kind == "sync" else local
                times[kind].append(_timed(model, opts[kind], x, y))
        ratios = [s / q for s, q in zip(times["sync"], times["local"], strict=True)]
        rows.append(
            {
                "config": name,
                "local_ms": 1e3 * statistics.median(times["local"]),
                "sync_ms": 1e3 * statistics.median(times["sync"]),
                "overhead_ms": 1e3
                * statistics.median(
                    [s - q for s, q in zip(times["sync"], times["local"], strict=True)]
                ),
                "ratio": statistics.median(ratios),
                "steps": steps,
            }
        )
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per model")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(folder, args.steps, queue), nprocs=WORLD, join=True)
        rows = queue.get()
    print(
        f"SyncBatchNorm vs local BatchNorm, {WORLD} processes, gloo on CPU, 1 thread each; "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"medians over {args.steps} alternating steps"
    )
    print("| model | local BN step (ms) | SyncBN step (ms) | overhead (ms) | sync/local |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['local_ms']:.2f} | {r['sync_ms']:.2f} "
            f"| {r['overhead_ms']:.2f} | {r['ratio']:.2f}x |"
        )
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
