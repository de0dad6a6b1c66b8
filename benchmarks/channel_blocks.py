"""Channel blocks or two-pass loops: which is faster for the training step on this processor.

bnorm's training passes over contiguous (N, C, *) data with spatial runs of 32 values or more can
fuse their two reads of x (and of dy and x in the backward) per block of channels
(``kernels._numba_loops.channel_block``), or run the two-pass loops. Which is faster depends on
the processor, so bnorm picks per vendor (``kernels.numba_cpu.RUN_BLOCK_BYTES``: blocks on Intel
processors, two passes elsewhere). This script measures the choice on the machine it runs on: the
same layer's forward+backward with blocks and without, and torch's, alternating in one process
(the setting is read at every call), timed as ``bnorm bench`` times its cases (its round-robin
with rotating order, untimed first call and samples of about 5 ms), and prints the median of the
round-by-round ratios.

Run: python benchmarks/channel_blocks.py [--shape 64x64x28x28 ...] [--rounds 61] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence

import torch

import bnorm
from bnorm.bench import _alternate, _median_ratio
from bnorm.kernels import numba_cpu

DEFAULT_SHAPES = ("32x32x16x16", "32x256x14x14", "64x128x256", "64x64x28x28", "128x64x56x56")


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, blocks: int) -> Callable:
    def step() -> None:
        numba_cpu.RUN_BLOCK_BYTES = blocks
        x.grad = None
        layer(x).backward(dy)

    return step


def measure(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """Median step times (ms) with blocks, without, and torch's, and the median ratios."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_()
    dy = torch.randn(shape, generator=g)
    ours = (bnorm.BatchNorm1d if len(shape) == 3 else bnorm.BatchNorm2d)(shape[1])
    theirs = (torch.nn.BatchNorm1d if len(shape) == 3 else torch.nn.BatchNorm2d)(shape[1])
    budget = numba_cpu.loops.BLOCK_BYTES
    fns = {
        "blocks": _step(ours, x, dy, budget),
        "two_pass": _step(ours, x, dy, 0),
        "torch": _step(theirs, x, dy, 0),
    }
    before = numba_cpu.RUN_BLOCK_BYTES
    try:
        times = _alternate(fns, rounds)
    finally:
        numba_cpu.RUN_BLOCK_BYTES = before
    row = {f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}
    row["two_pass_over_blocks"] = _median_ratio(times["two_pass"], times["blocks"])
    row["torch_over_blocks"] = _median_ratio(times["torch"], times["blocks"])
    row["torch_over_two_pass"] = _median_ratio(times["torch"], times["two_pass"])
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="NxCxL or NxCxHxW (repeatable)")
    parser.add_argument("--rounds", type=int, default=61, help="samples of each (61)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and bnorm) threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shape or DEFAULT_SHAPES]
    if any(len(s) not in (3, 4) for s in shapes):
        parser.error("shapes are NxCxL or NxCxHxW")
    default = "on" if numba_cpu.RUN_BLOCK_BYTES else "off"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, training step "
        f"(forward+backward), median of {args.rounds} alternating rounds; channel blocks are "
        f"{default} by default here"
    )
    print("| shape | MB | blocks ms | two-pass ms | torch ms | two-pass/blocks | torch/two-pass |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        r = measure(shape, args.rounds)
        mb = torch.Size(shape).numel() * 4 / 2**20
        print(
            f"| {'x'.join(map(str, shape))} | {mb:.2f} | {r['blocks_ms']:.3f} | "
            f"{r['two_pass_ms']:.3f} | {r['torch_ms']:.3f} | {r['two_pass_over_blocks']:.3f} | "
            f"{r['torch_over_two_pass']:.2f} |"
        )


if __name__ == "__main__":
    main()
