"""Training memory of a 20-block conv stack: torch's BatchNorm2d + activation vs bnorm's
BatchNormAct2d, plain and memory-efficient (In-Place ABN).

Each block is ``Conv2d(C, C, 3, padding=1, bias=False)`` followed by the normalization and the
activation. Two measures, both of one training step (forward, then backward of ``y.sum()``):

1. **bytes saved for backward**: every tensor autograd keeps between forward and backward,
   seen through ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage (the
   convolution's input *is* the previous block's output, so a tensor two ops keep counts
   once). Exact and deterministic.
2. **peak RSS growth**: each variant runs in a fresh subprocess; the growth of
   ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` from after setup (model and input built, one
   tiny warm-up step) to after the backward. It includes the forward's temporaries and the
   backward's transient buffers, and the allocator's behaviour; medians over ``--repeats``
   runs, alternating variants. The parent never imports torch: Linux carries a process's
   ``ru_maxrss`` across fork and exec, so a large parent would mask its children's peaks.
   By default the children run with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every
   large tensor by mmap and returns it to the OS when freed: the peak then follows the live
   tensors. ``--malloc default`` keeps glibc's adaptive threshold, under which freed 4 MiB
   blocks stay in the heap and the peak also measures the allocator's reuse pattern.

Usage: ``python benchmarks/memory.py [--batch 32] [--channels 32] [--size 32] [--repeats 3]
[--csv benchmarks/results/memory_<machine>_torch<version>.csv]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANT_NAMES = (
    "torch BatchNorm2d + ReLU",
    "torch BatchNorm2d + ReLU(inplace=True)",
    "torch BatchNorm2d + LeakyReLU(0.01)",
    "bnorm BatchNormAct2d(relu)",
    "bnorm BatchNormAct2d(leaky_relu)",
    "bnorm BatchNormAct2d(leaky_relu, memory_efficient)",
    "bnorm BatchNormAct2d(elu, memory_efficient)",
    "bnorm BatchNormAct2d(leaky_relu, memory_efficient, inplace)",
)


def variants() -> dict[str, Callable[[int], Any]]:
    # imported here, never in the parent (see the module docstring)
    from torch import nn

    import bnorm

    return {
        "torch BatchNorm2d + ReLU": lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()),
        "torch BatchNorm2d + ReLU(inplace=True)": lambda c: nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        ),
        "torch BatchNorm2d + LeakyReLU(0.01)": lambda c: nn.Sequential(
            nn.BatchNorm2d(c), nn.LeakyReLU(0.01)
        ),
        "bnorm BatchNormAct2d(relu)": lambda c: bnorm.BatchNormAct2d(c, "relu"),
        "bnorm BatchNormAct2d(leaky_relu)": lambda c: bnorm.BatchNormAct2d(c, "leaky_relu"),
        "bnorm BatchNormAct2d(leaky_relu, memory_efficient)": lambda c: bnorm.BatchNormAct2d(
            c, "leaky_relu", memory_efficient=True
        ),
        "bnorm BatchNormAct2d(elu, memory_efficient)": lambda c: bnorm.BatchNormAct2d(
            c, "elu", memory_efficient=True
        ),
        "bnorm BatchNormAct2d(leaky_relu, memory_efficient, inplace)": (
            lambda c: bnorm.BatchNormAct2d(
                c, "leaky_relu", memory_efficient=True, overwrite_input=True
            )
        ),
    }


def build(variant: str, channels: int, blocks: int = 20) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    make = variants()[variant]
    return nn.Sequential(
        *[
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), make(channels))
            for _ in range(blocks)
        ]
    )


def saved_bytes(variant: str, batch: int, channels: int, size: int) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    import torch

    model = build(variant, channels)
    x = torch.randn(batch, channels, size, size)
    storages: dict[int, int] = {}

    def pack(t: Any) -> Any:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    return sum(storages.values())


def child(variant: str, batch: int, channels: int, size: int) -> None:
    """One training step in this (fresh) process; prints the ru_maxrss growth in bytes, then
    the bytes saved for backward."""
    import torch

    torch.set_num_threads(2)
    model = build(variant, channels)
    x = torch.randn(batch, channels, size, size)
    # Warm up on a tiny input: libraries, kernels and the autograd engine are loaded, and
    # every parameter's .grad exists, before the baseline is taken.
    model(x[:2, :, :4, :4]).sum().backward()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(x).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    del model, x
    saved = saved_bytes(variant, batch, channels, size)
    print(json.dumps({"growth": (peak - base) * scale, "saved": saved, "torch": torch.__version__}))


def measure(variant: str, batch: int, channels: int, size: int, malloc: str) -> dict[str, Any]:
    env = dict(os.environ)
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--batch", str(batch),
         "--channels", str(channels), "--size", str(size)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--malloc", choices=["mmap", "default"], default="mmap")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.batch, args.channels, args.size)
        return
    activation = args.batch * args.channels * args.size**2 * 4
    growth: dict[str, list[int]] = {v: [] for v in VARIANT_NAMES}
    saved: dict[str, int] = {}
    version = "?"
    for _ in range(args.repeats):  # alternate variants, so load drifts hit them alike
        for v in VARIANT_NAMES:
            result = measure(v, args.batch, args.channels, args.size, args.malloc)
            growth[v].append(int(result["growth"]))
            saved[v] = int(result["saved"])  # deterministic: the same at every repeat
            version = result["torch"]
    print(
        f"20 blocks of Conv2d({args.channels}, {args.channels}, 3) + norm/act; input "
        f"({args.batch}, {args.channels}, {args.size}, {args.size}) fp32; one activation = "
        f"{activation / 2**20:.1f} MiB; torch {version}, {platform.machine()}; "
        f"malloc: {args.malloc}"
    )
    base = "torch BatchNorm2d + LeakyReLU(0.01)"
    rows = []
    print(
        f"| variant | saved for backward (MiB) | per block (activations) | vs {base} "
        f"| peak RSS growth (MiB, median of {args.repeats}) | vs {base} |"
    )
    print("|---|---|---|---|---|---|")
    for v in VARIANT_NAMES:
        rss = statistics.median(growth[v])
        rss_base = statistics.median(growth[base])
        row = {
            "variant": v,
            "saved_mib": saved[v] / 2**20,
            "activations_per_block": saved[v] / activation / 20,
            "saved_vs_base": saved[v] / saved[base],
            "rss_growth_mib": rss / 2**20,
            "rss_vs_base": rss / rss_base,
        }
        rows.append(row)
        print(
            f"| {v} | {row['saved_mib']:.1f} | {row['activations_per_block']:.2f} | "
            f"{row['saved_vs_base']:.2f} | {row['rss_growth_mib']:.1f} | {row['rss_vs_base']:.2f} |"
        )
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
